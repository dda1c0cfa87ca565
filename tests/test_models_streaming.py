"""Streaming: on the same traces, any batching and interleaving gives what batch scoring gives.

Both levels: a detector's own streaming contract (``init_state`` / ``score_calls``), and the A-VM's
scorer over event batches (:class:`vims.avm.scoring.WindowScorer`), processes keyed by ``(vm_id, pid)``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vims.avm.scoring import RESULT_SCHEMA, WindowScorer
from vims.errors import InputError
from vims.events import example_events
from vims.models.ensemble import Ensemble
from vims.models.knn import KNN
from vims.models.mlp import MLPNextCall
from vims.models.ngram import NGram
from vims.models.stide import Stide


def traces(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pats = [[0, 1, 2, 3], [3, 2, 5], [9, 1, 1, 2, 60]]
    return [sum((pats[i] for i in rng.integers(0, 3, rng.integers(2, 30))), [0, 59]) for _ in range(n)]


def interleave(test: list[list[int]], seed: int) -> pa.Table:
    """All calls of all traces, each trace a process, randomly interleaved but in order per process.

    Trace ``i`` is pid ``100 + i // 2`` of VM ``vm-{i % 2}``: the two VMs use the same pids."""
    rng = np.random.default_rng(seed)
    cursors = [0] * len(test)
    rows, vms = [], []
    live = [i for i, t in enumerate(test) if t]
    while live:
        i = live[rng.integers(len(live))]
        rows.append((100 + i // 2, "prog", test[i][cursors[i]], None))
        vms.append(f"vm-{i % 2}")
        cursors[i] += 1
        if cursors[i] == len(test[i]):
            live.remove(i)
    return example_events(rows, vm_id=vms)


MODELS = {
    "stide": lambda: Stide(k=4),
    "stide-window": lambda: Stide(k=5, aggregate="window", window=7),
    "ngram": lambda: NGram(order=4),
    "ngram-window": lambda: NGram(order=6, aggregate="window", window=10),
    "mlp": lambda: MLPNextCall(context=5, hidden=8, epochs=3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_detector_streams_equal_batch(name: str) -> None:
    model = MODELS[name]().fit(traces(30, seed=5))
    test = [*traces(6, seed=10), [0, 59, 777, 778, 0], [4]]  # unseen numbers, a 1-call trace
    rng = np.random.default_rng(0)
    batch = model.call_scores(test)
    for i, trace in enumerate(test):
        want = batch.values[batch.offsets[i]:batch.offsets[i + 1]]
        state = model.init_state()
        cuts = np.sort(rng.choice(np.arange(len(trace) + 1), size=min(3, len(trace) + 1), replace=False))
        got = [model.score_calls(state, trace[lo:hi]) for lo, hi in zip([0, *cuts], [*cuts, len(trace)], strict=True)]
        np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_stream_equals_batch(name: str, seed: int) -> None:
    model = MODELS[name]().fit(traces(30, seed=5))
    test = [*traces(12, seed=10 + seed), [0, 59, 777, 778, 0], [4]]  # unseen numbers, a 1-call trace
    events = interleave(test, seed)
    scorer = WindowScorer(model, segment=False)  # every process is one trace (its calls include execve)
    rng = np.random.default_rng(seed)
    n = events.num_rows
    cuts = np.sort(rng.choice(np.arange(1, n), size=15, replace=False))
    calls: dict[tuple[str, int], int] = {}
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        touched = scorer.score(events.slice(lo, hi - lo).to_batches()[0] if hi > lo else events.slice(0, 0))
        assert touched.schema == RESULT_SCHEMA
        for r in touched.to_pylist():
            calls[(r["vm_id"], r["pid"])] = r["total_calls"]
            assert r["threshold"] == model.anomaly_threshold
    got = scorer.trace_scores()
    want = model.anomaly_score(test)
    keys = [(f"vm-{i % 2}", 100 + i // 2, "prog") for i in range(len(test))]
    np.testing.assert_allclose([got[k] for k in keys], want, rtol=1e-9, atol=1e-12)
    assert [calls[k[:2]] for k in keys] == [len(t) for t in test]


def test_exec_of_a_new_program_starts_a_new_trace() -> None:
    model = NGram(order=3).fit(traces(20, seed=1))
    a, b = ([c for c in t if c not in (59, 60)] for t in traces(2, seed=3))
    b = [59, *b]  # sh execs another program
    ev = example_events({7: a + b}, comm="sh")
    rows = WindowScorer(model).score(ev).to_pylist()
    assert [r["calls"] for r in rows] == [len(a), len(b)]
    assert rows[0]["score"] == pytest.approx(float(model.anomaly_score([a])[0]), rel=1e-9)
    assert rows[1]["score"] == pytest.approx(float(model.anomaly_score([b])[0]), rel=1e-9)
    whole = WindowScorer(model, segment=False).score(ev).to_pylist()
    assert len(whole) == 1
    assert whole[0]["score"] == pytest.approx(float(model.anomaly_score([ev.column("nr").to_pylist()])[0]))


def test_whole_trace_models_and_bad_batches_are_refused() -> None:
    with pytest.raises(InputError, match="per-call detector"):
        WindowScorer(KNN().fit(traces(5, seed=0)))
    with pytest.raises(InputError, match="per-call detector"):
        WindowScorer(Ensemble([("s", Stide(k=3)), ("n", NGram(order=3))], cv=3).fit(traces(9, seed=0)))
    with pytest.raises(InputError, match="not fitted"):
        WindowScorer(NGram())
    scorer = WindowScorer(NGram().fit(traces(5, seed=0)))
    with pytest.raises(InputError, match="lacks column 'nr'"):
        scorer.score(pa.table({"vm_id": ["v"], "pid": [1], "comm": ["x"]}))
