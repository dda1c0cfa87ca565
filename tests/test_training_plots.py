"""``vims evaluate``'s figures, confusion numbers and the comparison of several models, on a small ADFA-LD subset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from vims.schemas import SCORE_SCHEMA, TRACE_SCHEMA
from vims.tables import read_table, write_table
from vims.training.core import select


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, adfa_zip: Path) -> tuple[Path, Path, Path]:
    """A 290-trace ADFA-LD subset and two stide models fitted on its Training part (k=4 and k=6)."""
    from vims.datasets.adfa import read_adfa_ld

    t = read_adfa_ld(adfa_zip)
    small = pa.concat_tables([select(t, ["train"]).slice(0, 150), select(t, ["validation"]).slice(0, 100),
                              select(t, ["attack"]).slice(0, 40)])
    d = tmp_path_factory.mktemp("plots")
    data = write_table(small, d / "a.parquet", TRACE_SCHEMA)
    for k in (4, 6):
        r = vims("train", "-d", data, "--detector", "stide", "-p", f"k={k}", "--cv", 3, "-o", d / f"stide{k}.skops")
        assert r.returncode == 0, r.stderr
    return data, d / "stide4.skops", d / "stide6.skops"


def test_report_has_its_figures_and_confusion_numbers(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    data, model, _ = models
    r = vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    for name in ("roc.png", "histograms.png", "confusion.png"):
        assert (tmp_path / "rep" / name).read_bytes().startswith(b"\x89PNG")
        assert f"]({name})" in (tmp_path / "rep" / "report.md").read_text()
    c = metrics["confusion"]
    assert c["true_positives"] + c["false_negatives"] == metrics["overall"]["n_attack"] == 40
    assert c["false_positives"] + c["true_negatives"] == metrics["overall"]["n_normal"] == 100
    at = metrics["overall"]["at_threshold"]
    assert c["false_positives"] / 100 == pytest.approx(at["false_alarm_rate"])
    assert c["recall"] == pytest.approx(at["detection_rate"])
    assert c["precision"] == pytest.approx(c["true_positives"] / (c["true_positives"] + c["false_positives"]))
    assert "precision" in (tmp_path / "rep" / "report.md").read_text()


def test_figures_follow_a_chosen_threshold(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    data, model, _ = models
    r = vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet", "--threshold", 0.0)
    assert r.returncode == 0, r.stderr
    r = vims("evaluate", "--scores", tmp_path / "s.parquet", "--split", "validation", "--split", "attack",
             "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["confusion"]
    scores = read_table(tmp_path / "s.parquet", SCORE_SCHEMA)
    flagged_normal = sum(1 for s, lab, sp in zip(scores.column("score").to_pylist(), scores.column("label").to_pylist(),
                                                 scores.column("split").to_pylist(), strict=True)
                         if s > 0 and lab == "normal" and sp == "validation")
    assert c["false_positives"] == flagged_normal and (tmp_path / "rep" / "confusion.png").stat().st_size > 1000


def test_several_models_in_one_table(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    data, k4, k6 = models
    r = vims("evaluate", "-m", k4, "-m", k6, "-d", data, "-o", tmp_path / "cmp", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = out["comparison"]
    assert {row["model"] for row in rows} == {"stide4", "stide6"}
    assert [row["auc"] for row in rows] == sorted((row["auc"] for row in rows), reverse=True)
    for row in rows:
        assert row["auc"] == out["models"][row["model"]]["overall"]["auc"]
        assert (tmp_path / "cmp" / row["model"] / "report.md").is_file()
        assert f"[{row['model']}]({row['model']}/report.md)" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text()) == rows
    r = vims("evaluate", "-m", k4, "-m", k6, "-d", data, "-o", tmp_path / "cmp2")
    assert r.returncode == 0 and "stide4" in r.stdout and "stide6" in r.stdout


def test_two_models_with_one_name_are_refused(tmp_path: Path, models: tuple[Path, Path, Path]) -> None:
    data, k4, _ = models
    r = vims("evaluate", "-m", k4, "-m", k4, "-d", data, "-o", tmp_path / "cmp")
    assert r.returncode == 2 and "share a name" in r.stderr and "Traceback" not in r.stderr
    r = vims("evaluate", "-m", k4, "-m", k4, "--scores", data, "-o", tmp_path / "cmp")
    assert r.returncode == 2 and "at most one --model" in r.stderr
