"""Detector names used by the commands (``--detector NAME``) and ``--param k=v`` parsing.

>>> sorted(DETECTORS)
['ensemble', 'knn', 'mlp', 'ngram', 'stide']
>>> make_detector("ngram", ["order=4", "aggregate=window"])
NGram(aggregate='window', order=4)
>>> make_detector("ensemble", ["weights=2,1"]).weights
[2.0, 1.0]
>>> make_detector("ngram", ["size=3"])
Traceback (most recent call last):
...
vims.errors.InputError: --param size=3: ngram has no parameter 'size' (it has order, aggregate, window, min_count)
"""

from __future__ import annotations

import inspect

from vims.errors import InputError
from vims.models.base import Detector
from vims.models.ensemble import Ensemble
from vims.models.knn import KNN
from vims.models.mlp import MLPNextCall
from vims.models.ngram import NGram
from vims.models.stide import Stide

DETECTORS: dict[str, type[Detector]] = {
    "stide": Stide,
    "ngram": NGram,
    "knn": KNN,
    "mlp": MLPNextCall,
    "ensemble": Ensemble,
}

#: The default detector: the ensemble of its default members (TF-IDF nearest neighbours and two
#: next-call MLPs over 10 calls, seeds 0 and 1), members normalised by their rank among out-of-fold
#: Training scores. Chosen without looking at ADFA-LD Validation (``benchmarks/bench_models.py
#: --select``): 3-fold out-of-fold Training scores against the attack traces, criterion ROC AUC +
#: detection at 5% false alarms, selected with each attack family left out in turn, then on all four
#: (1.449: AUC 0.880 + 0.569; the previous default ngram + mlp about 1.434). Fits ADFA-LD Training in
#: about 50 s of CPU; knn makes it a whole-trace model (no streaming): the per-program sets of the
#: A-VM pipeline stream an n-gram model instead.
DEFAULT_DETECTOR = "ensemble"


def detector_name(detector: Detector) -> str:
    """The registry name of ``detector``'s class."""
    for name, cls in DETECTORS.items():
        if type(detector) is cls:
            return name
    return type(detector).__name__


def _parse(value: str, default: object, where: str) -> object:
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise InputError(f"not a {type(default).__name__}: {value!r}", where=where) from None
    return value


def make_detector(name: str, params: list[str] | None = None) -> Detector:
    """A new detector ``name`` with ``params`` given as ``key=value`` strings (typed by the defaults)."""
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r} (choose from {', '.join(DETECTORS)})")
    cls = DETECTORS[name]
    sig = inspect.signature(cls.__init__)
    defaults = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    kwargs: dict[str, object] = {}
    for item in params or []:
        where = f"--param {item}"
        if "=" not in item:
            raise InputError("expected key=value", where=where)
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in defaults or key == "members":
            known = ", ".join(k for k in defaults if k != "members")
            raise InputError(f"{name} has no parameter {key!r} (it has {known})", where=where)
        if key == "weights":  # the ensemble's member weights: a comma-separated list
            try:
                kwargs[key] = [float(w) for w in value.split(",")]
            except ValueError:
                raise InputError(f"not a comma-separated list of numbers: {value!r}", where=where) from None
        else:
            kwargs[key] = _parse(value.strip(), defaults[key], where) if defaults[key] is not None else value
    return cls(**kwargs)
