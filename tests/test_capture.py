"""Cutting the collector's events into per-process traces."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from vims.datasets.capture import traces_from_events
from vims.errors import InputError
from vims.events import example_events
from vims.schemas import EVENT_SCHEMA, TRACE_SCHEMA
from vims.tables import read_table, write_table


def test_segments_between_execves_per_pid() -> None:
    ev = example_events([
        (10, "httpd", 0, None),            # httpd reading
        (11, "httpd", 56, None),           # clone: the child 11 is still httpd
        (11, "httpd", 59, "/usr/local/bin/sh"),  # $PATH search: fails...
        (11, "httpd", 59, "/bin/sh"),      # ...then works: one program start
        (11, "sh", 257, "/etc/shadow"),
        (10, "httpd", 1, None),
        (11, "sh", 59, "/bin/cat"),        # sh runs cat in the same task
        (11, "cat", 0, None),
        (11, "cat", 231, None),            # exit_group: pid 11 is free again
        (11, "ls", 0, None),               # a reused pid, a new task (trace started mid-way)
    ], vm_id="vm")
    t = traces_from_events(ev)
    assert t.schema.equals(TRACE_SCHEMA)
    rows = t.select(["trace_id", "program", "syscalls", "length", "label", "source"]).to_pylist()
    assert [(r["program"], r["syscalls"]) for r in rows] == [
        ("httpd", [0, 1]),
        ("httpd", [56]),
        ("sh", [59, 59, 257]),
        ("cat", [59, 0, 231]),
        ("ls", [0]),
    ]
    assert [r["trace_id"] for r in rows] == ["vims:vm:10:0", "vims:vm:11:1", "vims:vm:11:2",
                                             "vims:vm:11:6", "vims:vm:11:9"]
    assert all(r["label"] == "normal" and r["source"] == "vims" and r["length"] == len(r["syscalls"])
               for r in rows)


def test_order_is_by_seq_and_vms_are_apart() -> None:
    a = example_events([(5, "sh", 59, "/bin/ls"), (5, "ls", 0, None), (5, "ls", 1, None)], vm_id="a")
    b = example_events([(5, "x", 2, None)], vm_id="b")
    shuffled = pa.concat_tables([a, b]).take([2, 3, 0, 1])
    t = traces_from_events(shuffled, label="attack", split="attack", family="webshell")
    assert t.column("syscalls").to_pylist() == [[59, 0, 1], [2]]
    assert t.column("trace_id").to_pylist() == ["vims:a:5:0", "vims:b:5:0"]
    assert set(t.column("family").to_pylist()) == {"webshell"} and set(t.column("label").to_pylist()) == {"attack"}


def test_empty_and_wrong_tables() -> None:
    empty = traces_from_events(EVENT_SCHEMA.empty_table())
    assert empty.num_rows == 0 and empty.schema.equals(TRACE_SCHEMA)
    with pytest.raises(InputError, match=r"x.parquet: not an event table"):
        traces_from_events(pa.table({"seq": [1]}), where="x.parquet")


def test_execve_without_path_keeps_comm() -> None:
    t = traces_from_events(example_events([(3, "init", 0, None), (3, "init", 59, None), (3, "rcS", 1, None)]))
    assert t.column("program").to_pylist() == ["init", "init"]


def test_parquet_round_trip(tmp_path: Path) -> None:
    ev = example_events([(1, "a", 59, "/bin/a"), (1, "a", 0, None)])
    write_table(ev, tmp_path / "ev.parquet", EVENT_SCHEMA)
    t = traces_from_events(read_table(tmp_path / "ev.parquet", EVENT_SCHEMA))
    write_table(t, tmp_path / "tr.parquet", TRACE_SCHEMA)
    assert read_table(tmp_path / "tr.parquet", TRACE_SCHEMA).num_rows == 1


def test_self_exec_is_named_by_argv0() -> None:
    ev = example_events([(4, "httpd", 59, "/proc/self/exe"), (4, "exe", 0, None), (5, "x", 59, "/proc/self/exe")])
    ev = ev.set_column(ev.schema.get_field_index("argv"), "argv", pa.array(["sh -c cat /etc/shadow", None, None]))
    t = traces_from_events(ev)
    assert t.column("program").to_pylist() == ["sh", "exe"]
