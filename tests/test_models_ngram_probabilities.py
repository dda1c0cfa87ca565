"""The Kneser-Ney n-gram model is a probability model: each conditional distribution sums to 1.

The other n-gram tests check orderings and an AUC floor, which a wrong discount or a back-off weight cut
to a fraction still pass. Here every conditional distribution ``P(. | h)`` over the whole vocabulary
(every known call and the pooled unknown one) must sum to 1, for contexts seen in training and for
unseen ones, and a small model is checked against probabilities worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vims.models._seq import BOS, UNK
from vims.models.base import CallState
from vims.models.ngram import NGram

UNSEEN = -7  # a syscall number no trace below holds: it is scored as the pooled unknown call


def distribution(lm: NGram, context: np.ndarray) -> np.ndarray:
    """``P(w | context)`` for every call ``w`` of the vocabulary (known numbers, then the unknown one)."""
    calls = np.append(lm.vocab_.known, UNSEEN)
    states = [CallState(np.asarray(context, dtype=np.int64).copy()) for _ in calls]
    return np.exp(-lm.score_streams(states, calls, np.ones(len(calls), dtype=np.int64)))


traces = st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=30), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), train=traces, order=st.integers(1, 4))
def test_every_conditional_distribution_sums_to_one(data, train, order):
    lm = NGram(order=order).fit(train)
    codes = st.integers(0, lm.vocab_.size)  # UNK, BOS and every known code
    c = lm.context_
    # contexts that occur in training (a window of a padded trace) ...
    trace = lm.vocab_.encode(np.asarray(data.draw(st.sampled_from(train)), dtype=np.int64))
    padded = np.concatenate([np.full(c, BOS), trace])
    end = data.draw(st.integers(c, len(padded)))
    seen = padded[end - c:end]
    # ... and any context at all, mostly never seen
    unseen = np.array(data.draw(st.lists(codes, min_size=c, max_size=c)), dtype=np.int64)
    for context in (seen, unseen, np.full(c, BOS), np.full(c, UNK)):
        p = distribution(lm, context)
        assert np.all(p > 0), f"a call has no probability after {context.tolist()}"
        assert math.isclose(p.sum(), 1.0, rel_tol=1e-9), f"P(. | {context.tolist()}) sums to {p.sum()}"


@settings(max_examples=30, deadline=None)
@given(train=traces, more=traces, order=st.integers(1, 3))
def test_distributions_still_sum_to_one_after_an_update(train, more, order):
    lm = NGram(order=order).fit(train).update(more)
    for context in (np.full(lm.context_, BOS), np.full(lm.context_, UNK)):
        assert math.isclose(distribution(lm, context).sum(), 1.0, rel_tol=1e-9)


def test_a_small_bigram_model_has_the_probabilities_worked_out_by_hand():
    # Training trace 5 6 5 6, padded: BOS 5 6 5 6. Codes: UNK, 5, 6 (vocabulary of 3).
    # Bigram counts: (BOS 5) 1, (5 6) 2, (6 5) 1: n1 = 2, n2 = 1, discount D2 = 2 / (2 + 2) = 1/2.
    # Unigram continuation counts N1+(. w): 5 follows BOS and 6 -> 2; 6 follows 5 -> 1: total 3, 2 types;
    # n1 = 1, n2 = 1, D1 = 1/3. P1(w) = (max(N(w) - D1, 0) + D1 * 2 / 3) / 3:
    p1 = {5: 17 / 27, 6: 8 / 27, UNSEEN: 2 / 27}
    # After 5: c(5 6) = 2, one type; P(w | 5) = max(c(5 w) - D2, 0) / 2 + (D2 * 1 / 2) * P1(w).
    after5 = {5: 0.25 * p1[5], 6: 1.5 / 2 + 0.25 * p1[6], UNSEEN: 0.25 * p1[UNSEEN]}
    # After BOS: c(BOS 5) = 1, one type; P(w | BOS) = max(c(BOS w) - D2, 0) / 1 + (D2 * 1 / 1) * P1(w).
    after_bos = {5: 0.5 + 0.5 * p1[5], 6: 0.5 * p1[6], UNSEEN: 0.5 * p1[UNSEEN]}
    lm = NGram(order=2).fit([[5, 6, 5, 6]])
    assert lm.discounts_.tolist() == pytest.approx([1 / 3, 1 / 2])
    for before, expected in ((5, after5), (BOS, after_bos), (UNSEEN, p1), (6, None)):
        context = np.array([BOS if before == BOS else int(lm.vocab_.encode(np.array([before]))[0])])
        got = dict(zip([5, 6, UNSEEN], distribution(lm, context).tolist(), strict=True))
        if expected is None:  # after 6: c(6 5) = 1 -> P(5 | 6) = 1/2 + 1/2 * P1(5)
            expected = {5: 0.5 + 0.5 * p1[5], 6: 0.5 * p1[6], UNSEEN: 0.5 * p1[UNSEEN]}
        assert got == pytest.approx(expected, rel=1e-12), f"after {before}"
    # The surprise of a trace's calls is -log of these: 5 after BOS, then 6 after 5.
    assert lm.call_scores([[5, 6]]).values.tolist() == pytest.approx([-math.log(after_bos[5]),
                                                                      -math.log(after5[6])])
