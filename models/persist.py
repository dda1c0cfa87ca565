"""Safe model files: skops with an explicit list of trusted types, plus a JSON model card.

``save_model(det, "m.skops", card)`` writes ``m.skops`` and ``m.card.json`` (atomically, through
temporary files). The card records the detector and its parameters, the SHA-256 of the training data
(:func:`data_digest`, over the calls themselves, so the same traces give the same digest in any
file), the threshold and its target false-alarm rate, metrics, library versions, the update history,
and the SHA-256 of the model file. :func:`load_model` checks that digest first, then refuses any type
in the file that is not in :data:`TRUSTED` with a :class:`~vims.errors.VimsError`. Nothing is ever
unpickled.

>>> import tempfile, pathlib
>>> from vims.models.stide import Stide
>>> det = Stide(k=3).fit([[1, 2, 3, 4] * 3])
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.skops"
>>> card = save_model(det, path, {"training": {"n_traces": 1}})
>>> back, card = load_model(path)
>>> back.anomaly_score([[4, 3, 2, 1]]).tolist(), card["detector"], card_path(path).name
([1.0], 'stide', 'm.card.json')
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vims.console import to_json
from vims.errors import InputError, VimsError
from vims.models._seq import Flat

CARD_FORMAT = "vims-model-card"
CARD_VERSION = 1

#: Every type a VIMS model file may hold beyond what skops trusts by default. Loading refuses the rest.
TRUSTED: list[str] = [
    "vims.models.stide.Stide",
    "vims.models.ngram.NGram",
    "vims.models.knn.KNN",
    "vims.models.mlp.MLPNextCall",
    "vims.models.ensemble.Ensemble",
    "vims.models.modelset.ModelSet",
    "vims.models._seq.Vocab",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.preprocessing._label.LabelBinarizer",
    "scipy.sparse._csr.csr_matrix",
    "scipy.sparse._csr.csr_array",
    "numpy.float32",
    "numpy.float64",
    "numpy.int64",
    "numpy.uint64",
    "numpy.dtype",
]


def card_path(model_path: str | Path) -> Path:
    """The card beside a model file: ``m.skops`` -> ``m.card.json``."""
    p = Path(model_path)
    return p.with_name(p.stem + ".card.json") if p.suffix == ".skops" else p.with_name(p.name + ".card.json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digest(flat: Flat) -> str:
    """SHA-256 over the traces' calls and boundaries (int64, little-endian).

    >>> from vims.models import as_flat
    >>> data_digest(as_flat([[1, 2], [3]])) == data_digest(as_flat([[1, 2], [3]]))
    True
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(flat.offsets, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(flat.values, dtype="<i8").tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import scipy
    import sklearn
    import skops

    from vims import __version__

    return {"vims": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "scipy": scipy.__version__, "skops": skops.__version__}


def describe(detector: Any) -> dict[str, Any]:
    """The detector's name and JSON-able parameters (ensemble members described recursively)."""
    from vims.models.registry import detector_name

    params: dict[str, Any] = {}
    for key, value in detector.get_params(deep=False).items():
        if key == "members" and value is not None:
            params[key] = [{"name": n, **describe(d)} for n, d in value]
        elif isinstance(value, str | int | float | bool) or value is None:
            params[key] = value
        else:
            params[key] = repr(value)
    if getattr(detector, "members_", None) is not None and params.get("members") is None:
        params["members"] = [{"name": n, **describe(d)} for n, d in detector.members_]
    return {"detector": detector_name(detector), "params": params}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is no secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(detector: Any, path: str | Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``detector`` to ``path`` (skops) and its card beside it; returns the card written.

    ``card`` adds to (and overrides) the fields filled in here: format, detector, params,
    threshold, far, versions, created, sha256.
    """
    import skops.io as sio

    path = Path(path)
    data = sio.dumps(detector, compression=8)  # zipfile.ZIP_DEFLATED
    untrusted = sorted(set(sio.get_untrusted_types(data=data)) - set(TRUSTED))
    if untrusted:  # a file we could not load back is a bug here, not the user's problem
        raise RuntimeError(f"model holds types missing from TRUSTED: {', '.join(untrusted)}")
    full: dict[str, Any] = {"format": CARD_FORMAT, "version": CARD_VERSION, **describe(detector)}
    full["threshold"] = getattr(detector, "threshold_", None)
    full["far"] = getattr(detector, "far_", None)
    full["versions"] = versions()
    full["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    full.setdefault("updates", [])
    full.update(card or {})
    full["sha256"] = hashlib.sha256(data).hexdigest()
    _atomic_write(path, data)
    _atomic_write(card_path(path), (to_json(full) + "\n").encode())
    return full


def read_card(path: str | Path) -> dict[str, Any]:
    """The card of the model at ``path`` (an :class:`~vims.errors.InputError` if missing or bad)."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise InputError(f"model card {cpath.name} not found beside the model; refusing to load", where=path)
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a JSON model card: {exc}", where=cpath) from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or "sha256" not in card:
        raise InputError("not a VIMS model card", where=cpath)
    return card


def load_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a model written by :func:`save_model`: verify its SHA-256, refuse untrusted types."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise InputError("no such model file", where=path)
    card = read_card(path)
    digest = sha256_file(path)
    if digest != card["sha256"]:
        raise VimsError(f"SHA-256 {digest[:12]}... does not match its card ({str(card['sha256'])[:12]}...): "
                        "the model file was changed or replaced; refusing to load", where=path)
    from skops.io.exceptions import UntrustedTypesFoundException

    # one pass over the file: skops refuses any type beyond its defaults and TRUSTED while it loads
    try:
        model = sio.load(path, trusted=TRUSTED)
    except UntrustedTypesFoundException:
        refused = sorted(set(sio.get_untrusted_types(file=path)) - set(TRUSTED))
        raise VimsError(f"model file holds untrusted types: {', '.join(refused)}; refusing to load",
                        where=path) from None
    except Exception as exc:  # skops raises zipfile/JSON/key errors for a damaged file
        raise InputError(f"not a skops model file: {exc}", where=path) from exc
    return model, card
