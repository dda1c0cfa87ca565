"""Per-program model sets: fitted from a capture's trace table, saved safely, scored per program in the
A-VM pipeline with their calibrated window thresholds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vims.avm.agent import Agent
from vims.avm.replay import replay, score_table
from vims.avm.scoring import WindowScorer
from vims.errors import InputError
from vims.events import example_events
from vims.models.modelset import ModelSet
from vims.models.persist import load_model, save_model
from vims.training.per_program import fit_model_set, train_per_program, window_means


def _program_traces(seed: int, program: int, n: int, length: int = 300) -> list[list[int]]:
    """Traces of one made-up program: a Markov chain of its own over its own calls."""
    rng = np.random.default_rng(seed)
    calls = np.arange(10 * program, 10 * program + 12)
    nxt = np.random.default_rng(program).integers(0, 12, size=(12, 2))
    out = []
    for _ in range(n):
        c, trace = 0, []
        for _ in range(length):
            c = int(nxt[c, rng.integers(2)])
            trace.append(int(calls[c]))
        out.append(trace)
    return out


@pytest.fixture(scope="module")
def capture() -> pa.Table:
    a, b, c = _program_traces(1, 1, 12), _program_traces(2, 2, 12), _program_traces(3, 3, 2)
    rows = [("httpd", t) for t in a] + [("cron", t) for t in b] + [("rare", t) for t in c]
    return pa.table({"trace_id": [f"t{i}" for i in range(len(rows))], "program": [p for p, _ in rows],
                     "split": ["train"] * len(rows), "label": ["normal"] * len(rows),
                     "syscalls": pa.array([t for _, t in rows], pa.list_(pa.int32()))})


def test_fit_save_load_and_score_per_program(tmp_path, capture) -> None:
    ms, card = train_per_program(capture, detector="stide", params=["k=4"], min_traces=5, cv=3)
    assert set(ms.programs()) == {"httpd", "cron", "*"}  # "rare" has too few traces: the fallback scores it
    assert card["programs"]["httpd"]["n_traces"] == 12 and card["programs"]["*"]["n_traces"] == 26
    assert ms.for_program("rare")[0] == "*"
    save_model(ms, tmp_path / "set.skops", card)
    back, back_card = load_model(tmp_path / "set.skops")
    assert isinstance(back, ModelSet) and back_card["programs"] == card["programs"]
    # httpd's own calls are normal for its model; cron's calls scored as httpd would be very odd
    odd = capture.filter(pa.array([p == "cron" for p in capture.column("program").to_pylist()])).slice(0, 3)
    as_httpd = odd.set_column(odd.schema.get_field_index("program"), "program", pa.array(["httpd"] * 3))
    assert (back.anomaly_score(odd) < back.anomaly_score(as_httpd)).all()
    assert back.predict(as_httpd).tolist() == [-1, -1, -1]


def test_window_thresholds_are_calibrated_out_of_fold(capture) -> None:
    far = 0.1
    ms, card = fit_model_set(capture, detector="ngram", params=["order=3"], min_traces=5, far=far, cv=3)
    det = ms.programs()["httpd"]
    thr = ms.window_threshold("httpd")
    assert thr is not None and thr == card["programs"]["httpd"]["window_threshold"]
    # Checked independently of the card: of the windows of fresh normal traces of the same program (never
    # seen in the fit), about `far` lie above the threshold, neither far fewer (a threshold that never
    # alarms) nor far more (one that always does). Windows of a trace overlap, so the share is a noisy
    # estimate of the rate: the bounds are a factor of about 2.5 either way.
    fresh = _program_traces(9, 1, 40)
    calls = det.call_scores(fresh)
    share = float(np.mean(window_means(calls.values, calls.offsets, int(det.window)) > thr))
    assert far / 2.5 < share < far * 2.5, f"{share:.3f} of held-out normal windows alarm, target {far}"
    # An anomalous trace alarms: another program's calls, and a normal trace with a burst of them inside.
    foreign = _program_traces(10, 2, 1)[0]
    burst = fresh[0][:150] + foreign[:int(det.window)] + fresh[0][150:]
    for odd in (foreign, burst):
        calls = det.call_scores([odd])
        assert window_means(calls.values, calls.offsets, int(det.window)).max() > thr


def test_pipeline_scores_each_program_with_its_model(capture) -> None:
    ms, _ = fit_model_set(capture, detector="stide", params=["k=4"], min_traces=5, cv=3)
    test = {1: _program_traces(5, 1, 1)[0], 2: _program_traces(6, 2, 1)[0], 3: _program_traces(7, 3, 1)[0]}
    events = pa.concat_tables([example_events({1: test[1]}, comm="httpd"),
                               example_events({2: test[2]}, comm="cron", start_seq=300),
                               example_events({3: test[3]}, comm="rare", start_seq=600)])
    with Agent(ms, workers=2) as agent:
        replay(agent, events, batch_size=128)
        got = {(r["pid"], r["comm"]): r["score"] for r in score_table(agent, None).to_pylist()}
    every = ms.programs()
    assert got[(1, "httpd")] == pytest.approx(every["httpd"].anomaly_score([test[1]])[0])
    assert got[(2, "cron")] == pytest.approx(every["cron"].anomaly_score([test[2]])[0])
    assert got[(3, "rare")] == pytest.approx(every["*"].anomaly_score([test[3]])[0])
    rows = WindowScorer(ms).score(events).to_pylist()
    assert {r["comm"]: (r["program"], r["threshold"]) for r in rows} == {
        "httpd": ("httpd", ms.window_threshold("httpd")), "cron": ("cron", ms.window_threshold("cron")),
        "rare": ("*", ms.window_threshold("*"))}


def test_bad_input(capture) -> None:
    with pytest.raises(InputError, match="program"):
        fit_model_set(capture.drop_columns(["program"]))
    with pytest.raises(InputError, match="per-call"):
        from vims.models.knn import KNN

        WindowScorer(KNN().fit([[1, 2, 3]] * 3))
