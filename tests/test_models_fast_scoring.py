"""The fast scoring path of the default detector gives the scores of the straightforward one, on ADFA-LD.

The fast path scores every distinct trace once, lets the ensemble's MLPs share their distinct windows,
runs the forward pass on one BLAS thread, and builds the nearest-neighbour counts by one sort. The
reference path here scores every trace as it comes: every call's window through the network (no
de-duplication), and the n-gram count matrix the way scipy sums a coordinate list.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vims.models import as_flat
from vims.models._seq import BASE, BOS, Flat, ngram_codes, pad, unique_traces
from vims.models.ensemble import Ensemble
from vims.models.knn import _GOLDEN, KNN
from vims.models.mlp import MLPNextCall
from vims.training.core import select


@pytest.fixture(scope="module")
def adfa(adfa_zip) -> tuple[Flat, Flat]:
    from vims.datasets.adfa import read_adfa_ld

    table = read_adfa_ld(adfa_zip)
    rng = np.random.default_rng(0)
    train = as_flat(select(table, ["train"]))
    val = as_flat(select(table, ["validation"]))
    # a Validation sample with its duplicates: the de-duplication has something to do
    return train.take(rng.choice(train.n_traces, 200, replace=False)), val.take(np.arange(800))


def _reference_counts(knn: KNN, flat: Flat) -> sp.csr_matrix:
    """The hashed n-gram counts, one n-gram order at a time through a coordinate list."""
    n = int(knn.max_n)
    seq, at = pad(knn.vocab_.encode(flat.values), flat.offsets, n - 1, BOS)
    rows, cols = flat.trace_index(), []
    with np.errstate(over="ignore"):
        for m in range(1, n + 1):
            h = (ngram_codes(seq, at, m, BASE) ^ (np.uint64(m) << np.uint64(59))) * _GOLDEN
            cols.append((h >> np.uint64(64 - int(knn.bits))).astype(np.int64))
    counts = sp.csr_matrix((np.ones(len(rows) * n), (np.tile(rows, n), np.concatenate(cols))),
                           shape=(flat.n_traces, 1 << int(knn.bits)))
    counts.sum_duplicates()
    return counts


def _reference_mlp(mlp: MLPNextCall, flat: Flat) -> np.ndarray:
    """Mean surprise per trace, every call's window through the network."""
    seq, at = pad(mlp.vocab_.encode(flat.values), flat.offsets, mlp.context_, BOS)
    seq = np.where(seq >= mlp.n_codes_, 0, seq)
    windows = np.lib.stride_tricks.sliding_window_view(seq.astype(np.int16), mlp.context_ + 1)[at - mlp.context_]
    return mlp.aggregate_calls(mlp._forward(np.ascontiguousarray(windows)), flat.offsets)


class _ReferenceKNN(KNN):
    def _counts(self, flat: Flat) -> sp.csr_matrix:
        return _reference_counts(self, flat)


def test_unique_traces_on_adfa(adfa) -> None:
    _, val = adfa
    distinct, inverse = unique_traces(val)
    assert distinct.n_traces < val.n_traces  # ADFA-LD repeats traces
    back = distinct.take(inverse)
    assert np.array_equal(back.values, val.values) and np.array_equal(back.offsets, val.offsets)
    seen = {tuple(val.values[a:b]) for a, b in zip(val.offsets[:-1], val.offsets[1:], strict=True)}
    assert distinct.n_traces == len(seen)


def test_knn_counts_equal_the_coordinate_list_sum(adfa) -> None:
    train, val = adfa
    knn = KNN().fit(train)
    fast, ref = knn._counts(val), _reference_counts(knn, val)
    assert fast.has_canonical_format and (fast != ref).nnz == 0
    assert np.array_equal(fast.indptr, ref.indptr) and np.array_equal(fast.indices, ref.indices)


def test_default_ensemble_fast_path_equals_reference(adfa) -> None:
    train, val = adfa
    members = [("knn", KNN()), ("mlp", MLPNextCall(context=10, epochs=2, random_state=0)),
               ("mlp_seed1", MLPNextCall(context=10, epochs=2, random_state=1))]
    ens = Ensemble(members, cv=2).fit(train)
    fast = ens.anomaly_score(val)
    knn, mlp0, mlp1 = (det for _, det in ens.members_)
    ref_knn = _ReferenceKNN()
    ref_knn.__dict__.update(knn.__dict__)
    ref = ens.combine(np.stack([ref_knn.anomaly_score(val), _reference_mlp(mlp0, val), _reference_mlp(mlp1, val)],
                               axis=1))
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-9)
    # each member alone (its own de-duplication) agrees too
    np.testing.assert_allclose(mlp0.anomaly_score(val), _reference_mlp(mlp0, val), rtol=0, atol=1e-9)
    assert np.array_equal(knn.anomaly_score(val), ref_knn.anomaly_score(val))
