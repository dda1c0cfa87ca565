"""The streaming scorer: on the same traces, any batching and interleaving, it gives what batch scoring gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vims.errors import InputError, VimsError
from vims.models.ensemble import Ensemble
from vims.models.knn import KNN
from vims.models.mlp import MLPNextCall
from vims.models.ngram import NGram
from vims.models.stide import Stide
from vims.models.streaming import STREAM_SCORE_SCHEMA, StreamingScorer
from vims.schemas import EVENT_SCHEMA, conform


def traces(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    pats = [[0, 1, 2, 3], [3, 2, 5], [9, 1, 1, 2, 60]]
    return [sum((pats[i] for i in rng.integers(0, 3, rng.integers(2, 30))), [0, 59]) for _ in range(n)]


def event_table(rows: list[tuple[str, int, str, int]]) -> pa.Table:
    """Events in the real EVENT_SCHEMA (the collector's), from (vm_id, pid, comm, nr)."""
    n = len(rows)
    return conform(pa.table(
        {
            "seq": pa.array(range(n), pa.uint64()),
            "ts_ns": pa.array(range(n), pa.uint64()),
            "vm_id": [r[0] for r in rows],
            "vcpu": pa.array([0] * n, pa.uint16()),
            "pid": pa.array([r[1] for r in rows], pa.int32()),
            "tgid": pa.array([r[1] for r in rows], pa.int32()),
            "comm": [r[2] for r in rows],
            "cr3": pa.array([0] * n, pa.uint64()),
            "nr": pa.array([r[3] for r in rows], pa.int32()),
            "args": pa.array([[0] * 6] * n, pa.list_(pa.uint64(), 6)),
            "user_ip": pa.array([0] * n, pa.uint64()),
            "path": pa.array([None] * n, pa.string()),
        }), EVENT_SCHEMA)


def interleave(test: list[list[int]], seed: int) -> list[tuple[str, int, str, int]]:
    """All calls of all traces, each trace a process, randomly interleaved but in order per process."""
    rng = np.random.default_rng(seed)
    cursors = [0] * len(test)
    rows = []
    live = [i for i, t in enumerate(test) if t]
    while live:
        i = live[rng.integers(len(live))]
        rows.append((f"vm-{i % 2}", 100 + i, "prog", test[i][cursors[i]]))
        cursors[i] += 1
        if cursors[i] == len(test[i]):
            live.remove(i)
    return rows


MODELS = {
    "stide": lambda: Stide(k=4),
    "stide-window": lambda: Stide(k=5, aggregate="window", window=7),
    "ngram": lambda: NGram(order=4),
    "ngram-window": lambda: NGram(order=6, aggregate="window", window=10),
    "mlp": lambda: MLPNextCall(context=5, hidden=8, epochs=3),
    "ensemble": lambda: Ensemble([("s", Stide(k=3)), ("n", NGram(order=3, aggregate="window", window=5))], cv=3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_stream_equals_batch(name: str, seed: int) -> None:
    model = MODELS[name]().fit(traces(30, seed=5))
    test = [*traces(12, seed=10 + seed), [0, 59, 777, 778, 0], [4]]  # unseen numbers, a 1-call trace
    rows = interleave(test, seed)
    events = event_table(rows)
    scorer = StreamingScorer(model)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), size=15, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        touched = scorer.update(events.slice(lo, hi - lo).to_batches()[0] if hi > lo else events.slice(0, 0))
        assert touched.schema == STREAM_SCORE_SCHEMA
    got = scorer.scores()
    want = model.anomaly_score(test)
    by_pid = dict(zip(got.column("pid").to_pylist(), got.column("score").to_pylist(), strict=True))
    np.testing.assert_allclose([by_pid[100 + i] for i in range(len(test))], want, rtol=1e-9, atol=1e-12)
    n_calls = dict(zip(got.column("pid").to_pylist(), got.column("n_calls").to_pylist(), strict=True))
    assert [n_calls[100 + i] for i in range(len(test))] == [len(t) for t in test]
    threshold = getattr(model, "threshold_", -model.offset_)
    assert got.column("anomalous").to_pylist() == [s > threshold for s in got.column("score").to_pylist()]


def test_exec_of_a_new_program_starts_a_new_trace_and_reset_forgets() -> None:
    model = NGram(order=3).fit(traces(20, seed=1))
    a, b = traces(2, seed=3)
    rows = [("vm", 7, "sh", x) for x in a] + [("vm", 7, "sshd", x) for x in b]
    scorer = StreamingScorer(model)
    scorer.update(event_table(rows))
    row = scorer.scores().to_pylist()[0]
    assert row["comm"] == "sshd" and row["n_calls"] == len(b)
    assert row["score"] == pytest.approx(float(model.anomaly_score([b])[0]), rel=1e-9)
    whole = StreamingScorer(model, reset_on_exec=False)
    whole.update(event_table(rows))
    assert whole.scores().to_pylist()[0]["score"] == pytest.approx(float(model.anomaly_score([a + b])[0]))
    scorer.reset(("vm", 7))
    assert len(scorer) == 0 and scorer.scores().num_rows == 0


def test_whole_trace_models_and_bad_batches_are_refused() -> None:
    with pytest.raises(VimsError, match="cannot score a stream"):
        StreamingScorer(KNN().fit(traces(5, seed=0)))
    with pytest.raises(VimsError, match="not fitted"):
        StreamingScorer(NGram())
    scorer = StreamingScorer(NGram().fit(traces(5, seed=0)))
    with pytest.raises(InputError, match="lacks columns nr"):
        scorer.update(pa.table({"vm_id": ["v"], "pid": [1]}))
