"""``vims score --explain`` and ``vims update``'s progress, on small subsets of the real data sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from vims.schemas import TRACE_SCHEMA
from vims.syscalls import name, names
from vims.tables import write_table
from vims.training.core import select


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def adfa_small(adfa_zip: Path) -> pa.Table:
    """150 Training, 100 Validation and 40 attack traces of ADFA-LD."""
    from vims.datasets.adfa import read_adfa_ld

    t = read_adfa_ld(adfa_zip)
    return pa.concat_tables([select(t, ["train"]).slice(0, 150), select(t, ["validation"]).slice(0, 100),
                             select(t, ["attack"]).slice(0, 40)])


def test_i386_table_is_not_the_x86_64_one() -> None:
    assert len(names("i386")) == 451 and names("i386")[0] == "restart_syscall"
    assert [name(n, abi="i386") for n in (1, 3, 11, 102, 192, 243)] == [
        "exit", "read", "execve", "socketcall", "mmap2", "set_thread_area"]
    assert name(11) == "munmap"  # the x86-64 table stays the default


def test_unknown_abi_is_a_one_line_error() -> None:
    from vims.errors import InputError

    with pytest.raises(InputError, match="unknown system call ABI 'arm'"):
        names("arm")


def test_score_explain_names_adfa_calls_in_i386(tmp_path: Path, adfa_small: pa.Table) -> None:
    data = write_table(adfa_small, tmp_path / "a.parquet", TRACE_SCHEMA)
    model = tmp_path / "m.skops"
    r = vims("train", "-d", data, "--detector", "stide", "-p", "k=6", "-p", "window=10", "--cv", 3, "-o", model)
    assert r.returncode == 0, r.stderr
    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet", "--explain", "--windows", 2, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    explained = summary["explained"]
    assert len(explained) == summary["n_anomalous"] > 0
    assert [e["score"] for e in explained] == sorted((e["score"] for e in explained), reverse=True)
    by_id = {t: s for t, s in zip(adfa_small.column("trace_id").to_pylist(),
                                  adfa_small.column("syscalls").to_pylist(), strict=True)}
    for e in explained:
        assert 1 <= len(e["windows"]) <= 2
        calls = by_id[e["trace_id"]]
        for w in e["windows"]:
            nums = calls[w["start"]:w["start"] + len(w["calls"])]
            assert w["calls"] == [name(n, abi="i386") for n in nums]  # the 32-bit table, not x86-64's
            assert 0 < w["mean_surprise"] <= 1 and len(w["calls"]) == min(10, len(calls))
        means = [w["mean_surprise"] for w in e["windows"]]
        assert means == sorted(means, reverse=True)
    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s2.parquet", "--explain", "--windows", 1)
    assert r.returncode == 0, r.stderr
    first = explained[0]
    assert f"{first['trace_id']} ({first['label']}" in r.stdout and first["windows"][0]["line"] in r.stdout


def test_explain_refuses_a_whole_trace_detector(tmp_path: Path, adfa_small: pa.Table) -> None:
    data = write_table(adfa_small, tmp_path / "a.parquet", TRACE_SCHEMA)
    assert vims("train", "-d", data, "--detector", "knn", "--cv", 3, "-o", tmp_path / "k.skops").returncode == 0
    r = vims("score", "-m", tmp_path / "k.skops", "-d", data, "-o", tmp_path / "s.parquet", "--explain")
    assert r.returncode == 2 and "scores whole traces" in r.stderr and "Traceback" not in r.stderr


def test_explain_names_unm_calls_from_its_own_map(tmp_path: Path, unm_dir: Path) -> None:
    from vims.datasets.unm import read_unm, syscall_map

    folder = unm_dir / "synthetic-sendmail"
    table = read_unm(folder)
    names_map = syscall_map(folder)
    assert names_map[2] == "read" and names_map[4] == "open"  # SunOS numbering, not Linux's
    table = table.set_column(table.schema.get_field_index("split"), "split",
                             pa.array(["train" if lab == "normal" else "attack"
                                       for lab in table.column("label").to_pylist()], pa.string()))
    data = write_table(table, tmp_path / "u.parquet", TRACE_SCHEMA)
    model = tmp_path / "m.skops"
    assert vims("train", "-d", data, "--detector", "stide", "--cv", 3, "-o", model).returncode == 0
    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet", "--explain",
             "--syscall-map", folder / "syscallMap.txt", "--json")
    assert r.returncode == 0, r.stderr
    explained = json.loads(r.stdout)["explained"]
    assert explained and all(c in names_map.values() or c.startswith("sys_")
                             for e in explained for w in e["windows"] for c in w["calls"])
    assert any(c in ("open", "read", "write") for e in explained for w in e["windows"] for c in w["calls"])


def test_update_reports_every_step(adfa_small: pa.Table) -> None:
    from vims.models.calibration import update_steps
    from vims.training.core import train, update

    det, card = train(adfa_small, detector="stide", split="train", cv=3)
    steps: list[int] = []
    new = update(det, card, adfa_small, split="validation", cv=3, on_fold=steps.append)
    assert steps == [0, 1, 2, 3] == list(range(update_steps(100, 3)))
    assert new["updates"][-1]["n_traces"] == 100
    steps.clear()
    update(det, new, adfa_small, split="validation", cv=0, on_fold=steps.append)
    assert steps == [0]
