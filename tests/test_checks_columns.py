"""Checks declare their findings as typed columns (no guest needed): rows carry them in ``fields``,
a field a check did not declare (or of the wrong type) is refused, ``as_dict`` keeps its keys, the
Arrow table and Parquet files carry the fields, and ``vims check``'s output shows them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from vims.collector.checks import Check, Row, registry, rows_table
from vims.collector.checks.base import Column
from vims.collector.checks.cli import show, tables
from vims.schemas import CHECK_SCHEMA, conform
from vims.tables import read_table, write_table

SCHEMA_KEYS = ["check", "target", "status", "detail", "cost", "ts_ns"]


class Table(Check, register=False):
    """An example check of a table of entries."""

    name = "example-table"
    columns = (Column("nr", "int"), Column("entry", "hex"), Column("symbol"), Column("hooked", "bool"))

    def run(self, ctx: Any) -> Iterator[Row]:
        yield self.row("read (0)", "fail", "entry 0 points elsewhere", nr=0, entry=0xFFFFFFFFA0001000,
                       symbol="evil_read", hooked=True)
        yield self.row("table", "pass", "the rest match")


def rows() -> list[Row]:
    return list(Table().run(None))


def test_a_row_carries_every_declared_column() -> None:
    bad, good = rows()
    assert bad.fields == {"nr": 0, "entry": 0xFFFFFFFFA0001000, "symbol": "evil_read", "hooked": True}
    assert good.fields == {"nr": None, "entry": None, "symbol": None, "hooked": None}
    assert bad.detail == "entry 0 points elsewhere"


def test_an_undeclared_field_is_refused() -> None:
    with pytest.raises(TypeError, match="has no column 'page'"):
        Table().row("x", "fail", page=4096)


@pytest.mark.parametrize(("field", "value"), [("nr", "0"), ("nr", True), ("entry", 1.5), ("symbol", 3),
                                              ("hooked", 1)])
def test_a_field_of_the_wrong_type_is_refused(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"column '{field}' is"):
        Table().row("x", "fail", **{field: value})


def test_a_check_without_columns_takes_no_fields() -> None:
    class Bare(Check, register=False):
        """No columns."""

        name = "bare"

        def run(self, ctx: Any) -> Iterator[Row]:
            yield self.row("t", "pass")

    assert next(Bare().run(None)).fields == {}
    with pytest.raises(TypeError, match="its columns: none"):
        Bare().row("t", "fail", nr=1)


def test_columns_are_declared_properly() -> None:
    with pytest.raises(TypeError, match="one of str, int, hex, bool"):
        Column("page", "address")
    with pytest.raises(TypeError, match="distinct names"):
        class Twice(Check, register=False):
            """Two columns of one name."""

            name = "twice"
            columns = (Column("nr", "int"), Column("nr", "str"))

            def run(self, ctx: Any) -> Iterator[Row]:
                yield from ()


def test_as_dict_keeps_its_keys_and_adds_fields_on_request() -> None:
    bad = rows()[0]
    assert list(bad.as_dict()) == SCHEMA_KEYS
    with_fields = bad.as_dict(with_fields=True)
    assert list(with_fields) == [*SCHEMA_KEYS, "fields"]
    assert with_fields["fields"] == bad.fields
    with_fields["fields"]["nr"] = 7  # a copy: the row is not changed through it
    assert bad.fields["nr"] == 0


def test_rows_table_carries_the_fields_through_parquet(tmp_path: Path) -> None:
    table = rows_table([*rows(), Row("old", "t", "pass", "no columns")])
    assert table.schema.equals(CHECK_SCHEMA, check_metadata=False)
    write_table(table, tmp_path / "checks.parquet")
    back = read_table(tmp_path / "checks.parquet", CHECK_SCHEMA).to_pylist()
    assert json.loads(back[0]["fields"]) == rows()[0].fields
    assert json.loads(back[1]["fields"])["entry"] is None
    assert back[2]["fields"] is None
    assert [r["detail"] for r in back] == ["entry 0 points elsewhere", "the rest match", "no columns"]


def test_a_check_table_written_before_fields_existed_still_reads() -> None:
    old_schema = pa.schema([f for f in CHECK_SCHEMA if f.name != "fields"])
    old = pa.Table.from_pylist([r.as_dict() for r in rows()], schema=old_schema)
    table = conform(old, CHECK_SCHEMA, where="old.parquet")
    assert table.column("fields").to_pylist() == [None, None]
    assert table.column("target").to_pylist() == ["read (0)", "table"]


def test_the_json_output_shows_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    show(rows(), "g", json_out=True)
    printed = json.loads(capsys.readouterr().out)
    assert [list(r) for r in printed] == [[*SCHEMA_KEYS, "fields"]] * 2
    assert printed[0]["fields"] == {"nr": 0, "entry": 0xFFFFFFFFA0001000, "symbol": "evil_read", "hooked": True}


def test_the_table_output_has_one_table_per_check_with_its_columns() -> None:
    syscall = registry()["syscall-table"]()
    found = syscall.row("vhangup (153)", "fail", "points elsewhere", nr=153, entry=0xFFFFFFFF81000000)
    shown = tables([found, *rows(), Row("bare", "t", "pass", "fine")])
    assert [t.title for t in shown] == ["syscall-table", "example-table", "bare"]
    headers = [[c.header for c in t.columns] for t in shown]
    assert headers[0] == ["target", "status", *(c.name for c in syscall.columns), "detail"]
    assert headers[1] == ["target", "status", "nr", "entry", "symbol", "hooked", "detail"]
    assert headers[2] == ["target", "status", "detail"]
    cells = {c.header: list(c._cells) for c in shown[0].columns}
    assert cells["nr"] == ["153"] and cells["entry"] == ["0xffffffff81000000"] and cells["points_to"] == [""]
    assert cells["detail"] == ["points elsewhere"]


def test_the_table_output_prints(capsys: pytest.CaptureFixture[str]) -> None:
    show(rows(), "g")
    text = capsys.readouterr().out
    assert "integrity checks of guest 'g'" in text and "evil_read" in text


@pytest.mark.parametrize(("check", "names"), [
    ("kernel-text", {"symbol", "page", "offset"}),
    ("syscall-table", {"nr", "entry", "points_to", "expected"}),
    ("process-binaries", {"pid", "path", "page", "file_offset"}),
    ("hidden-processes", {"pid", "comm", "seen_in", "missing_from"}),
])
def test_each_check_declares_what_it_finds(check: str, names: set[str]) -> None:
    declared = {c.name for c in registry()[check].columns}
    assert names <= declared


def test_check_reference_that_does_not_exist_is_a_user_error(tmp_path) -> None:
    """`vims check --reference PATH`: a missing path is named before any guest is looked for."""
    import pytest

    from vims.collector.checks.cli import guest_context
    from vims.errors import InputError

    with pytest.raises(InputError, match="no such directory or disk image"):
        guest_context("no-such-guest", tmp_path / "missing.img")
