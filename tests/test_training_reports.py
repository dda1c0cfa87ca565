"""Reports must never mislead: each case of issue 21, run as the real command (fast detectors, small tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from vims.schemas import TRACE_SCHEMA
from vims.tables import write_table
from vims.training.core import select


def _small_table_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_training_cli_tables", Path(__file__).with_name(
        "test_training_cli.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


small_table = _small_table_module().small_table  # type: ignore[attr-defined]  # the table test_training_cli uses


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def refused(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


@pytest.fixture
def fitted(tmp_path: Path) -> tuple[Path, Path]:
    data = write_table(small_table(), tmp_path / "t.parquet", TRACE_SCHEMA)
    model = tmp_path / "m.skops"
    r = vims("train", "--data", data, "--detector", "ngram", "--param", "order=3", "--cv", 3, "-o", model)
    assert r.returncode == 0, r.stderr
    return data, model


def test_after_update_one_threshold_is_stated_everywhere(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    table = small_table()
    val = select(table, ["validation"])
    confirmed = write_table(val.slice(0, 20), tmp_path / "confirmed.parquet", TRACE_SCHEMA)
    r = vims("update", "-m", model, "-d", confirmed, "-o", tmp_path / "u.skops", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)["threshold"]
    card = json.loads((tmp_path / "u.card.json").read_text())
    assert card["threshold"] == card["calibration"]["threshold"] == new == card["updates"][0]["threshold_after"]
    assert card["updates"][0]["threshold_before"] != new  # the update moved it
    r = vims("score", "-m", tmp_path / "u.skops", "-d", data, "-o", tmp_path / "s.parquet", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["threshold"] == new
    r = vims("evaluate", "-m", tmp_path / "u.skops", "-d", data, "--split", "validation", "--split", "attack",
             "--exclude-fitted", "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["model"]["threshold"] == metrics["overall"]["at_threshold"]["threshold"] == new
    assert f"threshold {new:.6g} " in (tmp_path / "rep" / "report.md").read_text()


def test_evaluating_on_the_training_normals_is_refused(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    refused(vims("evaluate", "-m", model, "-d", data, "--split", "train", "--split", "attack",
                 "-o", tmp_path / "rep"), "the model was fitted on")
    assert not (tmp_path / "rep").exists()
    # fitted on every normal trace (UNM after `train --split all`): the default evaluation is refused
    r = vims("train", "--data", data, "--detector", "stide", "--split", "all", "--cv", 3, "-o", tmp_path / "a.skops")
    assert r.returncode == 0, r.stderr
    refused(vims("evaluate", "-m", tmp_path / "a.skops", "-d", data, "-o", tmp_path / "rep"), "fitted on")
    # the traces `vims update` added count as fitted on too
    conf = write_table(select(small_table(), ["validation"]), tmp_path / "conf.parquet", TRACE_SCHEMA)
    assert vims("update", "-m", model, "-d", conf, "-o", tmp_path / "u.skops").returncode == 0
    both = write_table(pa.concat_tables([select(small_table(), ["validation", "attack"])]),
                       tmp_path / "va.parquet", TRACE_SCHEMA)
    refused(vims("evaluate", "-m", tmp_path / "u.skops", "-d", both, "-o", tmp_path / "rep"), "fitted on")


def test_a_missed_false_alarm_target_is_pointed_out(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    _, model = fitted
    table = small_table()
    rows = table.to_pylist()
    for i, row in enumerate(rows):  # a third of the new normal traces call something never seen in training
        if row["split"] == "validation" and i % 3 == 0:
            row["syscalls"] = [*row["syscalls"], 77, 78, 79, 80]
    shifted = write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "v.parquet", TRACE_SCHEMA)
    r = vims("evaluate", "-m", model, "-d", shifted, "-o", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    check = json.loads((tmp_path / "rep" / "metrics.json").read_text())["target_check"]
    assert check["missed"] and check["target"] == 0.05 and check["actual"] > 0.3
    assert check["difference"] == pytest.approx(check["actual"] - 0.05) and "optimistic" in check["why"]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "misses its target" in report and "optimistic" in report
    assert "warning:" in r.stderr and "target 5%" in r.stderr
    # on the untouched data the target holds and nothing is said
    r = vims("evaluate", "-m", model, "-d", tmp_path / "t.parquet", "-o", tmp_path / "r2")
    assert r.returncode == 0 and "warning" not in r.stderr
    assert "misses" not in (tmp_path / "r2" / "report.md").read_text()


def test_empty_or_meaningless_evaluations_are_refused(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    refused(vims("evaluate", "-m", model, "-d", data, "--split", "validation", "-o", tmp_path / "rep"),
            "no attack traces")
    table = small_table()
    labels = ["benign" if x == "normal" else "malicious" for x in table.column("label").to_pylist()]
    other = write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)),
                        tmp_path / "bm.parquet", TRACE_SCHEMA)
    refused(vims("evaluate", "-m", model, "-d", other, "-o", tmp_path / "rep"), "benign, malicious")
    refused(vims("evaluate", "-m", model, "-d", data, "--split", "nosuch", "-o", tmp_path / "rep"),
            "splits present: attack, train, validation")
    assert not (tmp_path / "rep").exists()


def test_outputs_and_model_paths_of_the_wrong_kind(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    (tmp_path / "report").mkdir()
    refused(vims("score", "-m", model, "-d", data, "-o", tmp_path / "report"), "is a folder")
    assert vims("score", "-m", model, "-d", data, "-o", tmp_path / "scores.parquet").returncode == 0
    (tmp_path / "scores2.parquet").write_bytes(b"x")
    refused(vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "scores2.parquet"), "not a folder")
    refused(vims("score", "-m", tmp_path / "scores.parquet", "-d", data, "-o", tmp_path / "s3.parquet"),
            "Parquet table")
    refused(vims("evaluate", "-m", tmp_path / "m.card.json", "-d", data, "-o", tmp_path / "rep"),
            "pass the model file beside it (m.skops)")


def test_json_is_a_flag_in_help_and_ensemble_honours_cv(tmp_path: Path) -> None:
    for command in ("train", "score", "evaluate", "update"):
        r = vims(command, "--help")
        line = next(x for x in r.stdout.splitlines() if "--json" in x)
        assert "<bool>" not in line, line
    data = write_table(small_table(), tmp_path / "t.parquet", TRACE_SCHEMA)
    refused(vims("train", "-d", data, "--detector", "ensemble", "--cv", 2, "--param", "cv=3",
                 "-o", tmp_path / "e.skops"), "disagree")
    r = vims("train", "-d", data, "--detector", "ensemble", "--cv", 2, "-o", tmp_path / "e.skops", "--json")
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "e.card.json").read_text())
    assert card["params"]["cv"] == 2 and card["calibration"]["cv"] == 2


@pytest.mark.datasets
def test_adfa_evaluations_that_would_mislead(tmp_path: Path, adfa_zip: Path) -> None:
    model = tmp_path / "ng.skops"
    assert vims("train", "--data", adfa_zip, "--detector", "ngram", "-o", model).returncode == 0
    refused(vims("evaluate", "-m", model, "-d", adfa_zip, "--split", "train", "--split", "attack",
                 "-o", tmp_path / "rep"), "the model was fitted on")
    refused(vims("evaluate", "-m", model, "-d", adfa_zip, "--split", "validation", "-o", tmp_path / "rep"),
            "no attack traces")
    r = vims("evaluate", "-m", model, "-d", adfa_zip, "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)["target_check"]
    assert check["target"] == 0.05 and check["missed"] == (abs(check["difference"]) > check["tolerance"])


def test_thresholds_without_retraining_and_the_operating_point_table(tmp_path: Path,
                                                                     fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    card = json.loads((tmp_path / "m.card.json").read_text())
    r = vims("score", "-m", model, "-d", data, "--threshold", 0.5, "-o", tmp_path / "s.parquet", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threshold"] == 0.5
    from vims.schemas import SCORE_SCHEMA
    from vims.tables import read_table

    s = read_table(tmp_path / "s.parquet", SCORE_SCHEMA)
    assert s.column("anomalous").to_pylist() == [x > 0.5 for x in s.column("score").to_pylist()]
    r = vims("score", "-m", model, "-d", data, "--far", 0.2, "-o", tmp_path / "s2.parquet", "--json")
    assert r.returncode == 0, r.stderr
    loose = json.loads(r.stdout)["threshold"]
    assert loose < card["threshold"]  # 20% false alarms sits below the calibrated 5%
    refused(vims("score", "-m", model, "-d", data, "--far", 0.2, "--threshold", 1, "-o", tmp_path / "x.parquet"),
            "not both")
    r = vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "rep", "--json")
    points = json.loads(r.stdout)["operating_points"]
    assert [p["point"] for p in points] == ["1% false alarms", "5% false alarms", "10% false alarms",
                                             "chosen threshold"]
    assert points[-1]["threshold"] == card["threshold"] and set(points[0]["per_family"]) == {"Fam_A", "Fam_B"}
    assert all(0 <= p["false_alarm_rate"] <= 1 and 0 <= p["detection_rate"] <= 1 for p in points)
    assert "## Operating points" in (tmp_path / "rep" / "report.md").read_text()


def test_evaluate_a_score_table_without_scoring_again(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    r = vims("score", "-m", model, "-d", data, "--threshold", 0.5, "-o", tmp_path / "s.parquet")
    assert r.returncode == 0, r.stderr
    r = vims("evaluate", "--scores", tmp_path / "s.parquet", "--split", "validation", "--split", "attack",
             "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    direct = json.loads(vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "rep2", "--json").stdout)
    assert m["overall"]["auc"] == direct["overall"]["auc"] and m["overall"]["n_normal"] == 45
    refused(vims("evaluate", "--scores", tmp_path / "s.parquet", "-m", model, "-d", data, "-o", tmp_path / "r3"),
            "or --scores")
    refused(vims("evaluate", "--scores", tmp_path / "s.parquet", "--split", "validation", "-o", tmp_path / "r3"),
            "no attack traces")


def test_fitted_traces_among_others_are_found_trace_by_trace(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    """An update with part of a split, then an evaluation on the whole split: the fitted traces are found
    among the others (by the keys the card keeps), refused, or left out with --exclude-fitted and said."""
    data, model = fitted
    val = select(small_table(), ["validation"])
    confirmed = write_table(val.slice(0, 15), tmp_path / "confirmed.parquet", TRACE_SCHEMA)
    assert vims("update", "-m", model, "-d", confirmed, "-o", tmp_path / "u.skops", "--cv", 0).returncode == 0
    refused(vims("evaluate", "-m", tmp_path / "u.skops", "-d", data, "--split", "validation", "--split", "attack",
                 "-o", tmp_path / "rep"), "15 of the 45 normal traces")
    r = vims("evaluate", "-m", tmp_path / "u.skops", "-d", data, "--split", "validation", "--split", "attack",
             "--exclude-fitted", "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["excluded_fitted"] == 15 and metrics["overall"]["n_normal"] == 30
    assert "left out: 15 normal traces" in (tmp_path / "rep" / "report.md").read_text()
    # the same calls under another trace's id are another trace (data sets repeat traces): not refused
    renamed = val.slice(0, 15).set_column(0, "trace_id", pa.array([f"copy-{i}" for i in range(15)]))
    copies = write_table(pa.concat_tables([renamed, select(small_table(), ["attack"])]),
                         tmp_path / "copies.parquet", TRACE_SCHEMA)
    r = vims("evaluate", "-m", tmp_path / "u.skops", "-d", copies, "-o", tmp_path / "rep2", "--json")
    assert r.returncode == 0, r.stderr


def test_a_score_table_marks_the_fitted_traces_for_evaluate(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    """`vims score` marks the normal traces the model was fitted on, so `evaluate --scores` can refuse them as
    `evaluate --data` does; a table that cannot say (no `fitted` column) is evaluated with the doubt stated."""
    data, model = fitted
    assert vims("score", "-m", model, "-d", data, "-o", tmp_path / "s.parquet").returncode == 0
    from vims.schemas import SCORE_SCHEMA
    from vims.tables import read_table

    s = read_table(tmp_path / "s.parquet", SCORE_SCHEMA)
    marks = {(r["split"], r["label"], r["fitted"]) for r in s.to_pylist()}
    assert marks == {("train", "normal", True), ("validation", "normal", False), ("attack", "attack", False)}
    refused(vims("evaluate", "--scores", tmp_path / "s.parquet", "-o", tmp_path / "rep"),
            "the model was fitted on")
    assert not (tmp_path / "rep").exists()
    r = vims("evaluate", "--scores", tmp_path / "s.parquet", "--exclude-fitted", "-o", tmp_path / "rep", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    n_train = sum(1 for r in s.to_pylist() if r["split"] == "train")
    assert metrics["excluded_fitted"] == n_train and metrics["fitted_known"] is True
    assert metrics["overall"]["n_normal"] == 45
    # an older table, without the column: read as unknown, evaluated, and the report says so
    old = write_table(s.drop_columns(["fitted"]).filter(pa.array([r != "train" for r in
                                                                  s.column("split").to_pylist()])),
                      tmp_path / "old.parquet")
    r = vims("evaluate", "--scores", old, "-o", tmp_path / "rep-old")
    assert r.returncode == 0, r.stderr
    assert "cannot be ruled out" in r.stderr
    assert json.loads((tmp_path / "rep-old" / "metrics.json").read_text())["fitted_known"] is False
    assert "unknown overlap with training" in (tmp_path / "rep-old" / "report.md").read_text()


def test_evaluate_refuses_a_file_name_for_its_report_folder(tmp_path: Path, fitted: tuple[Path, Path]) -> None:
    data, model = fitted
    refused(vims("evaluate", "-m", model, "-d", data, "-o", tmp_path / "scores2.parquet"), "is the report folder")
    assert not (tmp_path / "scores2.parquet").exists()
