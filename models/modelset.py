"""Per-program model sets: a detector for each program the VM runs, and a fallback for the rest.

Different programs make very different system calls: a model of everything a VM does is blurred by
its busiest program. A :class:`ModelSet` maps program names (the task's ``comm``, at most 15
characters in Linux, so a longer name also matches its first 15 characters) to fitted detectors, and
scores everything else with ``fallback``. ``window_thresholds`` holds, per program key, the calibrated
threshold on the mean surprise of a window of calls that the A-VM pipeline uses
(:mod:`vims.avm.scoring`). A model set is saved and loaded like one detector
(:func:`vims.models.persist.save_model`, skops, trusted types only); fit one with
:func:`vims.training.per_program.fit_model_set`.

``lineage`` is what the training data said of which programs start which: per program, the calls of
it seen and the programs it started (a child process running another program, or the program an
``execve`` put in its place in the same task; a fork that keeps the program is no start).
:meth:`ModelSet.unseen_start` names the one start that this lineage rules out: a program that made at
least ``lineage_min_calls`` calls in training and never started any program (a web server's PHP
workers) starting one now (a web shell's ``sh``).
A program that started others in training may start new ones: no claim is made there.

>>> from vims.models.stide import Stide
>>> ms = ModelSet({"httpd": Stide(k=2).fit([[1, 2, 1, 2]])}, fallback=Stide(k=2).fit([[3, 4, 3, 4]]))
>>> ms.for_program("httpd")[0], ms.for_program("cron")[0]
('httpd', '*')
>>> import pyarrow as pa
>>> t = pa.table({"program": ["httpd", "cron"], "syscalls": [[1, 2, 1], [1, 2, 1]]})
>>> ms.anomaly_score(t).tolist()
[0.0, 1.0]
>>> ms.set_params(lineage={"httpd": {"calls": 5000, "children": {}},
...                        "sshd": {"calls": 900, "children": {"bash": 3}}})  # doctest: +ELLIPSIS
ModelSet(...)
>>> print(ms.unseen_start("httpd", "sh"))
httpd started no program in training (5,000 of its calls seen); here it started sh
>>> ms.unseen_start("sshd", "ls") is None, ms.unseen_start("httpd", "httpd") is None  # starts: a claim
(True, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from vims.errors import InputError, VimsError
from vims.models._seq import as_flat

FALLBACK = "*"
#: Key prefix of a program the fallback scores with a window threshold of its own (``"*:sleep"``).
FALLBACK_PREFIX = "*:"
#: Linux keeps at most this many characters of a program name in ``comm``.
COMM_LEN = 15


class ModelSet(BaseEstimator):
    """Program name -> fitted detector, with a fallback.

    Parameters
    ----------
    models : dict of str to Detector
        Fitted detectors by program name.
    fallback : Detector
        Fitted detector for any other program (key ``"*"``).
    window_thresholds : dict of str to float, optional
        Calibrated window thresholds by program key (``"*"`` for the fallback; ``"*:NAME"`` for a program
        NAME without a model of its own that the fallback scores with a threshold of its own).
    lineage : dict, optional
        ``{program: {"calls": calls seen, "children": {program started: times}}}`` from the training
        data (:func:`lineage_of`); None: the data did not say (traces without a ``parent`` column).
    lineage_min_calls : int
        Calls a program must have made in training, starting nothing, for a start by it to be ruled out.
    """

    def __init__(self, models: dict[str, Any] | None = None, fallback: Any = None,
                 window_thresholds: dict[str, float] | None = None,
                 lineage: dict[str, dict[str, Any]] | None = None, lineage_min_calls: int = 1000) -> None:
        self.models = models
        self.fallback = fallback
        self.window_thresholds = window_thresholds
        self.lineage = lineage
        self.lineage_min_calls = lineage_min_calls

    def _check(self) -> None:
        if self.fallback is None or not hasattr(self.fallback, "offset_"):
            raise VimsError("this model set has no fitted fallback model")

    @property
    def offset_(self) -> float:
        """The fallback's offset (what code written for one detector sees)."""
        self._check()
        return float(self.fallback.offset_)

    def programs(self) -> dict[str, Any]:
        """Every program key and its detector, the fallback as ``"*"``."""
        self._check()
        own = {k: self.fallback for k in (self.window_thresholds or {}) if k.startswith(FALLBACK_PREFIX)}
        return {**(self.models or {}), FALLBACK: self.fallback, **own}

    def for_program(self, name: str | None) -> tuple[str, Any]:
        """``(key, detector)`` that scores program ``name``."""
        self._check()
        every = {**(self.models or {}), **{k[len(FALLBACK_PREFIX):]: self.fallback
                                           for k in (self.window_thresholds or {}) if k.startswith(FALLBACK_PREFIX)}}
        key = _named(every, name)
        if key is not None:
            return (key if key in (self.models or {}) else FALLBACK_PREFIX + key), every[key]
        return FALLBACK, self.fallback

    def unseen_start(self, parent: str | None, child: str | None) -> str | None:
        """Why a process of ``parent`` starting ``child`` is out of line with the training data, or None.

        Out of line: ``parent`` made at least ``lineage_min_calls`` calls in training and never started
        a program. The names match as :meth:`for_program`'s do (a 15-character ``comm`` matches the
        longer name). No claim (None) without a lineage, for an unknown parent, or a child running its
        parent's program.
        """
        if not self.lineage or not parent or not child or child == parent:
            return None
        key = _named(self.lineage, parent)
        if key is None or key not in self.starting_nothing():
            return None
        calls = int(self.lineage[key]["calls"])
        return f"{parent} started no program in training ({calls:,} of its calls seen); here it started {child}"

    def starting_nothing(self) -> list[str]:
        """The programs of the lineage that made at least ``lineage_min_calls`` calls in training and
        started no program (those whose starts :meth:`unseen_start` rules out), sorted."""
        return sorted(p for p, v in (self.lineage or {}).items()
                      if not v["children"] and int(v["calls"]) >= self.lineage_min_calls)

    def window_threshold(self, key: str) -> float | None:
        """The calibrated window threshold of program ``key`` (None: not calibrated)."""
        value = (self.window_thresholds or {}).get(key)
        return None if value is None else float(value)

    def anomaly_score(self, X: Any) -> np.ndarray:  # noqa: N803 (scikit-learn naming)
        """Each trace scored by its program's detector; ``X`` is a trace table with a ``program`` column."""
        if not hasattr(X, "column_names") or "program" not in X.column_names:
            raise InputError("a model set scores trace tables with a 'program' column")
        flat = as_flat(X)
        programs = X.column("program").to_pylist()
        out = np.zeros(flat.n_traces)
        by_key: dict[str, list[int]] = {}
        for i, name in enumerate(programs):
            by_key.setdefault(self.for_program(name)[0], []).append(i)
        every = self.programs()
        for key, rows in by_key.items():
            out[rows] = every[key].anomaly_score(flat.take(rows))
        return out

    def score_samples(self, X: Any) -> np.ndarray:  # noqa: N803
        """Normality of each trace (``-anomaly_score``)."""
        return -self.anomaly_score(X)

    def predict(self, X: Any) -> np.ndarray:  # noqa: N803
        """+1 for traces under their program's threshold, -1 above it."""
        if not hasattr(X, "column_names") or "program" not in X.column_names:
            raise InputError("a model set scores trace tables with a 'program' column")
        scores = self.anomaly_score(X)
        every = self.programs()
        thr = np.array([-every[self.for_program(p)[0]].offset_ for p in X.column("program").to_pylist()])
        return np.where(scores > thr, -1, 1)


def _named(keys: Any, name: str | None) -> str | None:
    """The key among ``keys`` that names program ``name``: itself, or a longer name whose first 15
    characters it is (Linux keeps that much of a name in ``comm``); None if none does."""
    if name is None:
        return None
    if name in keys:
        return name
    return next((key for key in keys if len(key) > COMM_LEN and key[:COMM_LEN] == name), None)


def lineage_of(table: Any) -> dict[str, dict[str, Any]] | None:
    """Which programs started which in a trace table (its ``program``, ``parent`` and ``length``
    columns): ``{program: {"calls": calls of its traces, "children": {program: traces it started}}}``.
    None when the table has no parent for any trace (ADFA-LD, UNM, captures from before the column).

    >>> import pyarrow as pa
    >>> t = pa.table({"program": ["sshd", "bash", "ls", "nginx"], "parent": [None, "sshd", "bash", "nginx"],
    ...               "length": [40, 30, 20, 900]})
    >>> lineage_of(t)["bash"], lineage_of(t)["nginx"]
    ({'calls': 30, 'children': {'ls': 1}}, {'calls': 900, 'children': {}})
    """
    names = set(getattr(table, "column_names", ()))
    if not {"program", "parent", "length"} <= names or table.column("parent").null_count == table.num_rows:
        return None
    out: dict[str, dict[str, Any]] = {}
    rows = zip(table.column("program").to_pylist(), table.column("parent").to_pylist(),
               table.column("length").to_pylist(), strict=True)
    for program, parent, length in rows:
        if program is None:
            continue
        own = out.setdefault(program, {"calls": 0, "children": {}})
        own["calls"] += int(length)
        if parent is not None and parent != program:
            started = out.setdefault(parent, {"calls": 0, "children": {}})["children"]
            started[program] = started.get(program, 0) + 1
    return out
