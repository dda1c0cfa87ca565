"""``WindowScorer(threshold=...)`` (``vims avm run --threshold``-style override) is the threshold applied.

Each program run's windows above threshold are counted here independently: the mean surprise over the
last ``window`` calls at every call (fewer at a process's start), compared with the override.
"""

from __future__ import annotations

import numpy as np
import pytest

from vims.avm.scoring import WindowScorer
from vims.events import example_events
from vims.models.stide import Stide

TRACES = {7: [1, 2, 1, 2, 1, 2, 1, 2], 8: [1, 2, 2, 2, 1, 1, 2, 2]}


def _above(det: Stide, trace: list[int], window: int, threshold: float) -> int:
    calls = det.call_scores([trace]).values
    means = [calls[max(0, i - window + 1):i + 1].mean() for i in range(len(calls))]
    return int(np.sum(np.array(means) > threshold))


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 0.5, 0.9, 5.0])
def test_the_threshold_given_is_the_one_windows_are_judged_by(threshold: float) -> None:
    det = Stide(k=2).fit([[1, 2, 1, 2, 1, 2]])
    rows = WindowScorer(det, window=2, threshold=threshold).score(example_events(TRACES)).to_pylist()
    assert {r["pid"] for r in rows} == set(TRACES)
    for r in rows:
        assert r["threshold"] == threshold
        assert r["windows_above"] == _above(det, TRACES[r["pid"]], 2, threshold), r
