"""``vims train / score / evaluate / update``, run as the real command on small tables and on ADFA-LD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vims.schemas import SCORE_SCHEMA, TRACE_SCHEMA
from vims.tables import read_table, write_table


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def small_table() -> pa.Table:
    rng = np.random.default_rng(0)
    pats = [[3, 4, 5, 6], [3, 5, 5, 6, 7], [90, 91, 3, 4]]
    rows = []
    for i in range(90):
        split = "train" if i < 45 else "validation"
        calls = sum((pats[j] for j in rng.integers(0, 3, rng.integers(4, 12))), [11, 45])
        rows.append((f"n{i}", split, "normal", None, calls, "web" if i % 2 else "db"))
    for i in range(12):
        calls = [11, 45, *rng.choice([3, 4, 5, 102, 120, 200], size=30).tolist()]
        rows.append((f"a{i}", "attack", "attack", "Fam_A" if i < 6 else "Fam_B", calls, "web" if i % 2 else "db"))
    return pa.table({
        "trace_id": [r[0] for r in rows], "source": ["test"] * len(rows), "program": [r[5] for r in rows],
        "split": [r[1] for r in rows], "label": [r[2] for r in rows], "family": [r[3] for r in rows],
        "syscalls": [r[4] for r in rows], "length": [len(r[4]) for r in rows],
    })


@pytest.mark.parametrize("detector,params", [
    ("stide", ["k=4"]), ("ngram", ["order=4"]), ("knn", []),
    ("mlp", ["context=4", "hidden=16", "epochs=40"]), ("ensemble", ["cv=3"]),
])
def test_train_score_evaluate_update_on_a_small_table(tmp_path: Path, detector: str, params: list[str]) -> None:
    data = write_table(small_table(), tmp_path / "t.parquet", TRACE_SCHEMA)
    model = tmp_path / "m.skops"
    extra = [a for p in params for a in ("--param", p)]  # the ensemble: its default members
    r = vims("train", "--data", data, "--detector", detector, *extra, "--cv", 3, "-o", model, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["detector"] == detector and summary["training"]["n_traces"] == 45
    card = json.loads((tmp_path / "m.card.json").read_text())
    assert card["training"]["split"] == "train" and len(card["training"]["data_sha256"]) == 64

    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet", "--json")
    assert r.returncode == 0, r.stderr
    scores = read_table(tmp_path / "s.parquet", SCORE_SCHEMA)
    assert scores.num_rows == 102 and json.loads(r.stdout)["n_anomalous"] >= 6
    assert scores.column("anomalous").to_pylist() == [s > card["threshold"] for s in scores.column("score").to_pylist()]

    r = vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["overall"]["n_normal"] == 45  # the training split is left out
    assert metrics["overall"]["auc"] > 0.9
    assert set(metrics["per_family"]) == {"Fam_A", "Fam_B"} and set(metrics["per_program"]) == {"web", "db"}
    for name in ("metrics.json", "roc.png", "report.md"):
        assert (tmp_path / "rep" / name).stat().st_size > 100
    assert (tmp_path / "rep" / "roc.png").read_bytes().startswith(b"\x89PNG")

    r = vims("update", "-m", model, "-d", data, "--split", "validation", "-o", tmp_path / "u.skops", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads((tmp_path / "u.card.json").read_text())
    assert len(new["updates"]) == 1 and new["updates"][0]["n_traces"] == 45
    assert new["training"] == card["training"] and new["sha256"] != card["sha256"]


def test_per_program_model_set_trains_and_scores_by_program(tmp_path: Path) -> None:
    data = write_table(small_table(), tmp_path / "t.parquet", TRACE_SCHEMA)
    model = tmp_path / "set.skops"
    r = vims("train", "--data", data, "--per-program", "--detector", "stide", "--param", "k=3", "--cv", 3,
             "-o", model, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kind"] == "model-set" and set(summary["programs"]) == {"web", "db", "*"}
    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet", "--json")
    assert r.returncode == 0, r.stderr
    scores = read_table(tmp_path / "s.parquet", SCORE_SCHEMA).to_pylist()
    attacks = [s for s in scores if s["label"] == "attack"]
    assert sum(s["anomalous"] for s in attacks) >= 6  # each scored by its own program's model and threshold
    normal = [s["score"] for s in scores if s["label"] == "normal"]
    assert min(a["score"] for a in attacks) > float(np.median(normal))


def test_user_mistakes_are_one_line_and_status_2(tmp_path: Path) -> None:
    data = write_table(small_table(), tmp_path / "t.parquet", TRACE_SCHEMA)
    cases = [
        ("train", "--data", tmp_path / "none.parquet", "-o", tmp_path / "m.skops"),
        ("train", "--data", data, "--detector", "lstm", "-o", tmp_path / "m.skops"),
        ("train", "--data", data, "--param", "k", "--detector", "stide", "-o", tmp_path / "m.skops"),
        ("train", "--data", data, "--split", "nosuch", "-o", tmp_path / "m.skops"),
        ("score", "-m", tmp_path / "none.skops", "-d", data, "-o", tmp_path / "s.parquet"),
    ]
    for args in cases:
        r = vims(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr
    assert not (tmp_path / "m.skops").exists()
    r = vims("train", "--data", data, "--detector", "stide", "-o", tmp_path / "m.skops")
    assert r.returncode == 0
    (tmp_path / "m.skops").write_bytes((tmp_path / "m.skops").read_bytes() + b"x")
    r = vims("score", "-m", tmp_path / "m.skops", "-d", data, "-o", tmp_path / "s.parquet")
    assert r.returncode == 2 and "does not match its card" in r.stderr


@pytest.mark.datasets
def test_adfa_standard_protocol_and_update(tmp_path: Path, adfa_zip: Path) -> None:
    from vims.datasets.adfa import read_adfa_ld
    from vims.training.core import select

    table = read_adfa_ld(adfa_zip)
    data = write_table(table, tmp_path / "adfa.parquet", TRACE_SCHEMA)
    model = tmp_path / "ng.skops"
    assert vims("train", "--data", data, "--detector", "ngram", "-o", model).returncode == 0
    r = vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["overall"]
    assert (m["n_normal"], m["n_attack"]) == (4372, 504)
    assert m["auc"] > 0.82 and m["dr"]["5%"] > 0.25  # measured 0.838 and 0.313

    # 30% of the normal validation traces, confirmed normal, go into the model
    val = select(table, ["validation"])
    rng = np.random.default_rng(0)
    chosen = np.zeros(val.num_rows, dtype=bool)
    chosen[rng.choice(val.num_rows, size=int(0.3 * val.num_rows), replace=False)] = True
    write_table(val.filter(pa.array(chosen)), tmp_path / "confirmed.parquet", TRACE_SCHEMA)
    rest = pa.concat_tables([val.filter(pa.array(~chosen)), select(table, ["attack"])])
    write_table(rest, tmp_path / "rest.parquet", TRACE_SCHEMA)
    r = vims("update", "-m", model, "-d", tmp_path / "confirmed.parquet", "-o", tmp_path / "ng2.skops", "--json")
    assert r.returncode == 0, r.stderr
    r = vims("evaluate", "-m", tmp_path / "ng2.skops", "-d", tmp_path / "rest.parquet", "-o", tmp_path / "rep2",
             "--json")
    after = json.loads(r.stdout)["overall"]
    assert after["n_normal"] == val.num_rows - chosen.sum()
    assert after["auc"] > 0.86  # measured 0.871 for ngram (knn: 0.899); before the update 0.838
    assert after["auc"] > m["auc"] + 0.02


def test_help_shows_flags_without_a_type() -> None:
    """``--json`` and ``--help`` take no value, so no command's help gives them a ``<bool>`` type."""
    for path in (["train"], ["score"], ["evaluate"], ["update"], ["datasets", "split"], []):
        result = vims(*path, "--help")
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout, path
        assert "--help" in result.stdout and ("--json" in result.stdout or not path)
