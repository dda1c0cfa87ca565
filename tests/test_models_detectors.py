"""The detectors: the scikit-learn outlier API, input forms, unseen calls, updates, bad input, ADFA-LD."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from vims.errors import InputError, VimsError
from vims.models import as_flat
from vims.models.calibration import calibrate, oof_scores, recalibrate_update
from vims.models.ensemble import Ensemble
from vims.models.knn import KNN
from vims.models.mlp import MLPNextCall
from vims.models.ngram import NGram
from vims.models.registry import DETECTORS, make_detector
from vims.models.stide import Stide


def normal_traces(n: int = 30, seed: int = 0) -> list[list[int]]:
    """Traces of a small 'program': loops over a few call patterns with random repeats."""
    rng = np.random.default_rng(seed)
    patterns = [[3, 4, 5, 6], [3, 5, 5, 6, 7], [90, 91, 3, 4]]
    out = []
    for _ in range(n):
        trace: list[int] = [11, 45]
        for _ in range(rng.integers(5, 15)):
            trace += patterns[rng.integers(len(patterns))]
        out.append([*trace, 1])
    return out


def attack_traces(n: int = 10, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[11, 45, *rng.choice([3, 4, 5, 6, 7, 90, 91, 102, 120, 200], size=40).tolist(), 1] for _ in range(n)]


def small(name: str):
    if name == "mlp":
        return MLPNextCall(context=4, hidden=16, epochs=15)
    if name == "ensemble":
        return Ensemble([("stide", Stide(k=4)), ("ngram", NGram(order=4)), ("knn", KNN())], cv=3)
    return DETECTORS[name]()


NAMES = sorted(DETECTORS)


@pytest.mark.parametrize("name", NAMES)
def test_outlier_api_and_separation(name: str) -> None:
    normal, attack = normal_traces(), attack_traces()
    det = small(name).fit(normal)
    sn, sa = det.score_samples(normal_traces(10, seed=5)), det.score_samples(attack)
    assert sn.shape == (10,) and sa.shape == (10,)
    assert sn.min() > sa.max(), "every attack less normal than every normal trace"
    np.testing.assert_allclose(det.decision_function(attack), sa - det.offset_)
    np.testing.assert_array_equal(det.anomaly_score(attack), -sa)
    assert set(det.predict(attack).tolist()) <= {-1, 1} and (det.predict(attack) == -1).all()


@pytest.mark.parametrize("name", NAMES)
def test_input_forms_agree_and_unseen_calls_are_pooled(name: str) -> None:
    normal = normal_traces()
    det = small(name).fit(normal)
    test = [*normal_traces(3, seed=9), [99999, -4, 3, 4, 2**31 - 1], []]
    arrow = pa.table({"syscalls": pa.array(test, type=pa.list_(pa.int32()))})
    frame = pd.DataFrame({"syscalls": test, "other": range(len(test))})
    a = det.score_samples(test)
    np.testing.assert_allclose(det.score_samples(arrow), a)
    np.testing.assert_allclose(det.score_samples(frame), a)
    np.testing.assert_allclose(det.score_samples([np.asarray(t, dtype=np.int16) for t in test[:-2]]), a[:-2])
    assert np.isfinite(a).all()


@pytest.mark.parametrize("name", NAMES)
def test_update_learns_new_normal_behaviour(name: str) -> None:
    det = small(name).fit(normal_traces())
    new = [[11, 45, *([200, 201, 202, 203] * 8), 1] for _ in range(6)]
    before = det.anomaly_score(new).mean()
    det.update(new)
    after = det.anomaly_score(new).mean()
    assert after < before
    assert det.n_traces_seen_ == 36


def test_counts_after_update_equal_a_refit_for_count_models() -> None:
    a, b = normal_traces(20, seed=1), normal_traces(20, seed=2)
    test = [*normal_traces(5, seed=3), *attack_traces(5)]
    for cls in (Stide, NGram):
        updated = cls().fit(a).update(b)
        refit = cls().fit(a + b)
        np.testing.assert_allclose(updated.anomaly_score(test), refit.anomaly_score(test))


def test_bad_input_and_parameters_are_clear_errors() -> None:
    with pytest.raises(InputError, match="trace 1 is not a sequence of integers"):
        Stide().fit([[1, 2], ["a", "b"]])
    with pytest.raises(InputError, match="'syscalls' column"):
        Stide().fit(pa.table({"calls": [[1]]}))
    with pytest.raises(InputError, match="zero traces"):
        NGram().fit([])
    with pytest.raises(InputError, match="order must be between"):
        NGram(order=12).fit(normal_traces())
    with pytest.raises(InputError, match="aggregate must be one of"):
        Stide(aggregate="median").fit(normal_traces())
    with pytest.raises(VimsError, match="not fitted"):
        NGram().score_samples([[1]])
    with pytest.raises(InputError, match="unknown detector 'lstm'"):
        make_detector("lstm")
    with pytest.raises(InputError, match="not a int"):
        make_detector("stide", ["k=six"])


def test_windowed_score_finds_a_short_burst_in_a_long_trace() -> None:
    normal = normal_traces(40)
    burst = [*normal[0] * 10, 200, 201, 202, 203, 204, 205, *normal[1] * 10]
    for cls in (Stide, NGram):
        mean, local = cls().fit(normal), cls(aggregate="window", window=10).fit(normal)
        m = mean.anomaly_score([burst, normal[2]])
        w = local.anomaly_score([burst, normal[2]])
        assert w[0] - w[1] > m[0] - m[1]


def test_calibration_uses_out_of_fold_scores() -> None:
    normal = normal_traces(60)
    det = calibrate(NGram(order=4), normal, far=0.1, cv=5)
    oof = oof_scores(NGram(order=4), normal, cv=5)
    np.testing.assert_allclose(det.calibration_scores_, oof)
    assert det.threshold_ == pytest.approx(np.quantile(oof, 0.9))
    # in-sample scores are optimistic: the out-of-fold threshold is higher
    assert det.threshold_ > np.quantile(det.anomaly_score(normal), 0.9)
    fresh = normal_traces(200, seed=42)
    assert np.mean(det.predict(fresh) == -1) < 0.25
    recalibrate_update(det, normal_traces(30, seed=7), cv=3)
    assert len(det.calibration_scores_) == 90 and det.far_ == 0.1


def test_ensemble_normalises_members_out_of_fold() -> None:
    normal = normal_traces(45)
    ens = Ensemble([("stide", Stide(k=4)), ("ngram", NGram(order=4))], cv=3).fit(normal)
    assert ens.oof_anomaly_.shape == (45,)
    assert abs(np.median(ens.oof_anomaly_)) < 1.0  # members centred on their out-of-fold medians
    calibrated = calibrate(Ensemble([("stide", Stide(k=4))], cv=3), normal, far=0.1)
    np.testing.assert_allclose(calibrated.calibration_scores_, calibrated.oof_anomaly_)


def test_ensemble_rank_normalisation_keeps_each_members_order() -> None:
    normal, attack = normal_traces(45), attack_traces()
    members = [("ngram", NGram(order=4)), ("knn", KNN())]
    ranked = Ensemble(members, cv=3, normalise="rank").fit(normal)
    # out-of-fold normal traces get their ranks: between 1/45 and 1, median near 0.5
    assert ranked.oof_anomaly_.min() > 0 and ranked.oof_anomaly_.max() <= 1.0
    assert abs(np.median(ranked.oof_anomaly_) - 0.5) < 0.15
    # beyond the largest out-of-fold score the order is kept (no tie at rank 1)
    member = np.stack([d.anomaly_score(attack) for _, d in ranked.members_], axis=1)
    far_out = member.max(axis=0) + np.array([[1.0, 0.1], [2.0, 0.2]])
    lo, hi = ranked.combine(far_out)
    assert 1.0 < lo < hi
    # one member: the ensemble is a monotone map of it
    single = Ensemble([("ngram", NGram(order=4))], cv=3, normalise="rank").fit(normal)
    x = normal_traces(20, seed=9) + attack
    a, b = single.anomaly_score(x), single.members_[0][1].anomaly_score(x)
    assert (np.diff(a[np.argsort(b, kind="stable")]) >= 0).all()
    iqr = Ensemble(members, cv=3, normalise="iqr").fit(normal)
    assert abs(np.median(iqr.oof_anomaly_)) < 1.0 and iqr.anomaly_score(attack).min() > iqr.oof_anomaly_.max()
    with pytest.raises(InputError, match="normalise"):
        Ensemble(members, normalise="zscore").fit(normal)


@pytest.mark.datasets
def test_kneser_ney_on_adfa_standard_protocol(adfa_zip) -> None:
    from vims.datasets.adfa import read_adfa_ld
    from vims.training.core import select
    from vims.training.metrics import auc

    table = read_adfa_ld(adfa_zip)
    lm = NGram().fit(select(table, ["train"]))
    normal = lm.anomaly_score(select(table, ["validation"]))
    attack = lm.anomaly_score(select(table, ["attack"]))
    assert auc(normal, attack) > 0.82  # measured 0.838
    assert as_flat(select(table, ["train"])).n_traces == 833
