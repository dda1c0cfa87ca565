"""Model files: skops + card round trip, and refusal of changed files, untrusted types, missing cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from vims.errors import InputError, VimsError
from vims.models.calibration import calibrate
from vims.models.ensemble import Ensemble
from vims.models.knn import KNN
from vims.models.mlp import MLPNextCall
from vims.models.ngram import NGram
from vims.models.persist import TRUSTED, card_path, load_model, save_model, sha256_file
from vims.models.stide import Stide

NORMAL = [[1, 2, 3, 4] * 4, [1, 2, 3] * 5, [2, 3, 4, 7] * 5, [1, 2, 3, 4, 2, 3] * 3] * 4
TEST = [[1, 2, 3, 4] * 3, [4, 3, 2, 1] * 3, [99, 1, 2]]


class Sneaky:
    """A class no model file may contain."""

    def __init__(self) -> None:
        self.payload = "would run code on load if pickled"


@pytest.mark.parametrize("make", [
    lambda: Stide(k=3), lambda: NGram(order=3), lambda: KNN(),
    lambda: MLPNextCall(context=3, hidden=4, epochs=2),
    lambda: Ensemble([("s", Stide(k=3)), ("m", MLPNextCall(context=3, hidden=4, epochs=2)), ("k", KNN())], cv=3),
])
def test_round_trip_keeps_scores_threshold_and_card(tmp_path: Path, make) -> None:
    det = calibrate(make(), NORMAL, far=0.1, cv=3)
    save_model(det, tmp_path / "m.skops", {"training": {"n_traces": len(NORMAL)}})
    back, read = load_model(tmp_path / "m.skops")
    np.testing.assert_allclose(back.anomaly_score(TEST), det.anomaly_score(TEST))
    assert back.threshold_ == det.threshold_ and read == json.loads(card_path(tmp_path / "m.skops").read_text())
    assert read["sha256"] == sha256_file(tmp_path / "m.skops") and read["far"] == 0.1
    assert read["training"] == {"n_traces": len(NORMAL)} and read["updates"] == []
    assert {"vims", "numpy", "scikit-learn", "skops"} <= set(read["versions"])
    back.update([[5, 6, 7] * 4])  # a loaded model can still learn
    with open(tmp_path / "m.skops", "rb") as f:
        assert not f.read(2).startswith(b"\x80")  # a zip (skops), never a pickle stream


def test_changed_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.skops"
    save_model(NGram(order=3).fit(NORMAL), path)
    other = tmp_path / "other.skops"
    save_model(NGram(order=2).fit(NORMAL), other)
    path.write_bytes(other.read_bytes())  # swapped, card left alone
    with pytest.raises(VimsError, match="does not match its card"):
        load_model(path)


def test_untrusted_types_are_refused_even_with_a_matching_card(tmp_path: Path) -> None:
    path = tmp_path / "evil.skops"
    det = Stide(k=3).fit(NORMAL)
    det.extra_ = Sneaky()
    data = sio.dumps(det)
    path.write_bytes(data)
    card = {"format": "vims-model-card", "version": 1, "sha256": sha256_file(path)}
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(VimsError, match=r"untrusted types: .*Sneaky; refusing to load"):
        load_model(path)
    with pytest.raises(RuntimeError, match="missing from TRUSTED"):
        save_model(det, tmp_path / "x.skops")


def test_missing_or_damaged_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such model file"):
        load_model(tmp_path / "none.skops")
    path = tmp_path / "m.skops"
    save_model(Stide(k=3).fit(NORMAL), path)
    card_path(path).unlink()
    with pytest.raises(InputError, match=r"model card m\.card\.json not found"):
        load_model(path)
    card_path(path).write_text("{not json")
    with pytest.raises(InputError, match="not a JSON model card"):
        load_model(path)
    junk = tmp_path / "junk.skops"
    junk.write_bytes(b"not a zip")
    card_path(junk).write_text(json.dumps({"format": "vims-model-card", "sha256": sha256_file(junk)}))
    with pytest.raises(InputError, match="not a skops model file"):
        load_model(junk)


def test_trusted_list_is_explicit() -> None:
    assert all("." in name and "*" not in name for name in TRUSTED)
    assert not any(name.startswith(("builtins.eval", "builtins.exec", "os.", "subprocess.")) for name in TRUSTED)
