"""``vims datasets split`` on the real UNM data: deterministic per seed, per program, accepted by train/evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from vims.datasets.splits import assign_splits
from vims.errors import InputError
from vims.schemas import TRACE_SCHEMA
from vims.tables import read_table, write_table


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def login_ps(unm_dir: Path) -> pa.Table:
    from vims.datasets.unm import read_unm

    return read_unm(unm_dir / "login-ps")


def _splits(t: pa.Table) -> dict[str, str]:
    return dict(zip(t.column("trace_id").to_pylist(), t.column("split").to_pylist(), strict=True))


def test_split_is_deterministic_per_seed_and_row_order(login_ps: pa.Table) -> None:
    a = _splits(assign_splits(login_ps, seed=7))
    assert a == _splits(assign_splits(login_ps.take(list(range(login_ps.num_rows))[::-1]), seed=7))
    assert a != _splits(assign_splits(login_ps, seed=8))
    labels = dict(zip(login_ps.column("trace_id").to_pylist(), login_ps.column("label").to_pylist(), strict=True))
    assert all((s == "attack") == (labels[t] == "attack") for t, s in a.items())


def test_each_program_gets_train_and_validation(login_ps: pa.Table) -> None:
    t = assign_splits(login_ps, train=0.3, seed=0)
    for program in ("login", "ps"):
        rows = [s for s, p, lab in zip(t.column("split").to_pylist(), t.column("program").to_pylist(),
                                       t.column("label").to_pylist(), strict=True) if p == program and lab == "normal"]
        assert {"train", "validation"} <= set(rows)
        assert rows.count("train") == max(1, min(len(rows) - 1, round(0.3 * len(rows))))


def test_refuses_splits_it_would_overwrite_and_bad_fractions(login_ps: pa.Table) -> None:
    once = assign_splits(login_ps)
    with pytest.raises(InputError, match="has splits already"):
        assign_splits(once)
    assert _splits(assign_splits(once, seed=5, overwrite=True)) == _splits(assign_splits(login_ps, seed=5))
    with pytest.raises(InputError, match="between 0 and 1"):
        assign_splits(login_ps, train=1.0)


def test_split_file_is_what_train_and_evaluate_take(tmp_path: Path, login_ps: pa.Table) -> None:
    raw = write_table(login_ps, tmp_path / "lp.parquet", TRACE_SCHEMA)
    r = vims("datasets", "split", raw, "-o", tmp_path / "s.parquet", "--seed", 1, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["by"]["split"].keys() == {"attack", "train", "validation"}
    assert _splits(read_table(tmp_path / "s.parquet", TRACE_SCHEMA)) == _splits(assign_splits(login_ps, seed=1))
    r = vims("train", "-d", tmp_path / "s.parquet", "--detector", "stide", "--cv", 2, "-o", tmp_path / "m.skops")
    assert r.returncode == 0, r.stderr
    r = vims("evaluate", "-m", tmp_path / "m.skops", "-d", tmp_path / "s.parquet", "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    o = json.loads(r.stdout)["overall"]
    assert o["n_attack"] == 39 and o["n_normal"] == sum(1 for s in _splits(assign_splits(login_ps, seed=1)).values()
                                                        if s == "validation")
    r = vims("datasets", "split", tmp_path / "s.parquet", "-o", tmp_path / "again.parquet")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
