"""The sampling policy of the syscall tracer: what to trace, when, and how much.

A policy is a small JSON (or TOML) document; REM-S sends it to the A-VM through the control
channel (:meth:`Policy.from_dict` / :meth:`Policy.to_dict`), an operator passes it to
``vims collect --policy FILE``. Every field is optional::

    {
      "version": 1,
      "mode": "duty-cycle",        # "full" (default): trace all the time
                                   # "duty-cycle": trace window_ms out of every period_ms
      "window_ms": 100,
      "period_ms": 1000,
      "include": ["httpd", "sh"],  # program names (the task's comm), shell-style patterns;
                                   # empty or absent = every program
      "exclude": ["kworker/*"],    # applied after include
      "include_calls": ["execve", "openat", "connect"],  # system calls by x86-64 name or number;
                                   # empty or absent = every call
      "exclude_calls": ["futex"],  # applied after include_calls
      "max_events_per_s": 2000     # cap on events kept per second; 0 or null = no cap
    }

Outside the duty-cycle window the tracer removes its watchpoint, so the guest runs at full speed;
the program and call filters act on each trapped event (the watchpoint cannot tell programs or calls
apart; the QEMU plugin applies both at the call where it can, before a record takes a ring slot), and when the
per-second cap is reached the tracer also disarms until the next second.

A call filter is for captures that need only some calls (``vims collect``: who opens what, who
connects where): the behaviour models are fitted on every call of a program, so an A-VM that scores a
filtered stream sees sequences no normal trace had, and its reports turn anomalous (never normal).

>>> p = Policy.from_dict({"mode": "duty-cycle", "window_ms": 100, "period_ms": 1000})
>>> p.duty
0.1
>>> Policy.from_dict({"mode": "sometimes"})
Traceback (most recent call last):
...
vims.errors.InputError: policy: field 'mode': must be one of 'full', 'duty-cycle', not 'sometimes'
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.errors import InputError
from vims.jsonfile import read_json
from vims.syscalls import number

POLICY_VERSION = 1
MODES = ("full", "duty-cycle")
_FIELDS = ("version", "mode", "window_ms", "period_ms", "include", "exclude", "include_calls", "exclude_calls",
           "max_events_per_s")


def _number(data: Mapping[str, Any], name: str, default: float | None, where: str,
            minimum: float = 0.0, allow_none: bool = False) -> float | None:
    value = data.get(name, default)
    if value is None and allow_none:
        return None
    # bool is an int in Python; "window_ms": true is a mistake, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"field {name!r}: must be a number, not {value!r}", where=where)
    if value != value or value < minimum or value == float("inf"):
        raise InputError(f"field {name!r}: must be a finite number >= {minimum:g}, not {value!r}",
                         where=where)
    return float(value)


def _patterns(data: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = data.get(name) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"field {name!r}: must be a list of program names or patterns, not {value!r}",
                         where=where)
    return tuple(value)


def _calls(data: Mapping[str, Any], name: str, where: str) -> tuple[str | int, ...]:
    value = data.get(name) or []
    if isinstance(value, str | int):
        value = [value]
    if not isinstance(value, list | tuple):
        raise InputError(f"field {name!r}: must be a list of system call names or numbers, not {value!r}",
                         where=where)
    return tuple(value)


@dataclass(frozen=True)
class Policy:
    """What the tracer traces. Build it from a document with :meth:`from_dict` or :meth:`load`.

    Parameters
    ----------
    mode : {"full", "duty-cycle"}
        Trace all the time, or ``window_ms`` out of every ``period_ms``.
    window_ms, period_ms : float
        The duty cycle (only used in ``duty-cycle`` mode); ``0 < window_ms <= period_ms``.
    include, exclude : tuple of str
        Shell-style patterns on the program name (the kernel's ``comm``, at most 15 characters).
        An empty ``include`` keeps every program; ``exclude`` wins over ``include``.
    include_calls, exclude_calls : tuple of str or int
        System calls by x86-64 name (``"openat"``) or number; an empty ``include_calls`` keeps every
        call, ``exclude_calls`` wins over it. Kept as given (:meth:`to_dict` writes them back so).
    max_events_per_s : float or None
        Keep at most this many events per second (``None``: no cap).

    Examples
    --------
    >>> p = Policy(include=("httpd", "s?"), exclude=("sh",))
    >>> p.wants("httpd"), p.wants("sh"), p.wants("ss"), p.wants("cat")
    (True, False, True, False)
    >>> Policy().to_dict()["mode"]
    'full'
    >>> c = Policy(include_calls=("openat", 59), exclude_calls=("execve",))
    >>> c.wants_call(257), c.wants_call(59), c.wants_call(0), Policy().wants_call(0)
    (True, False, False, True)
    """

    mode: str = "full"
    window_ms: float = 100.0
    period_ms: float = 1000.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_calls: tuple[str | int, ...] = ()
    exclude_calls: tuple[str | int, ...] = ()
    max_events_per_s: float | None = None
    _include_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _kept_calls: frozenset[int] | None = field(default=None, init=False, repr=False, compare=False)
    _dropped_calls: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()
        # One compiled regex per list: the filter runs on every event.
        inc = re.compile("|".join(fnmatch.translate(p) for p in self.include)) if self.include else None
        exc = re.compile("|".join(fnmatch.translate(p) for p in self.exclude)) if self.exclude else None
        object.__setattr__(self, "_include_re", inc)
        object.__setattr__(self, "_exclude_re", exc)
        kept = frozenset(map(number, self.include_calls)) if self.include_calls else None
        object.__setattr__(self, "_kept_calls", kept)
        object.__setattr__(self, "_dropped_calls", frozenset(map(number, self.exclude_calls)))

    def validate(self, where: str = "policy") -> None:
        """Raise :class:`~vims.errors.InputError` naming the first field that is wrong."""
        if self.mode not in MODES:
            raise InputError(f"field 'mode': must be one of {', '.join(map(repr, MODES))}, not {self.mode!r}",
                             where=where)
        if self.mode == "duty-cycle":
            if not self.period_ms > 0:
                raise InputError(f"field 'period_ms': must be > 0, not {self.period_ms!r}", where=where)
            if not 0 < self.window_ms <= self.period_ms:
                raise InputError(f"field 'window_ms': must be > 0 and <= period_ms ({self.period_ms:g}), "
                                 f"not {self.window_ms!r}", where=where)
        for name in ("include_calls", "exclude_calls"):
            for call in getattr(self, name):
                try:
                    number(call)
                except InputError as exc:
                    raise InputError(f"field {name!r}: {exc.message}", where=where) from None
        if self.max_events_per_s is not None and not self.max_events_per_s > 0:
            raise InputError(f"field 'max_events_per_s': must be > 0 or null, not {self.max_events_per_s!r}",
                             where=where)

    @property
    def duty(self) -> float:
        """The fraction of time the trap is armed (1.0 in ``full`` mode)."""
        return 1.0 if self.mode == "full" else self.window_ms / self.period_ms

    def wants(self, comm: str) -> bool:
        """Whether events of the program named ``comm`` are kept."""
        if self._include_re is not None and not self._include_re.match(comm):
            return False
        return not (self._exclude_re is not None and self._exclude_re.match(comm))

    @property
    def filters_calls(self) -> bool:
        """Whether the policy keeps only some system calls."""
        return bool(self.include_calls or self.exclude_calls)

    def wants_call(self, nr: int) -> bool:
        """Whether events of system call number ``nr`` are kept."""
        if self._kept_calls is not None and nr not in self._kept_calls:
            return False
        return nr not in self._dropped_calls

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "policy") -> Policy:
        """Build a policy from its document; errors name the field (and ``where``).

        >>> Policy.from_dict({"window_ms": 5, "colour": "red"})
        Traceback (most recent call last):
        ...
        vims.errors.InputError: policy: unknown field 'colour' (known: version, mode, window_ms, ...)
        """
        if not isinstance(data, Mapping):
            raise InputError(f"a policy is a JSON object, not {type(data).__name__}", where=where)
        unknown = [k for k in data if k not in _FIELDS]
        if unknown:
            raise InputError(f"unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})", where=where)
        version = data.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise InputError(f"field 'version': this collector reads version {POLICY_VERSION}, "
                             f"not {version!r}", where=where)
        mode = data.get("mode", "full")
        if not isinstance(mode, str):
            raise InputError(f"field 'mode': must be a string, not {mode!r}", where=where)
        mode = mode.replace("_", "-")
        cap = _number(data, "max_events_per_s", None, where, allow_none=True)
        try:
            return cls(
                mode=mode,
                window_ms=_number(data, "window_ms", 100.0, where) or 0.0,
                period_ms=_number(data, "period_ms", 1000.0, where) or 0.0,
                include=_patterns(data, "include", where),
                exclude=_patterns(data, "exclude", where),
                include_calls=_calls(data, "include_calls", where),
                exclude_calls=_calls(data, "exclude_calls", where),
                max_events_per_s=cap or None,
            )
        except InputError as exc:
            raise InputError(exc.message, where=where) from None

    def to_dict(self) -> dict[str, Any]:
        """The policy as its JSON document (round-trips through :meth:`from_dict`).

        >>> p = Policy(mode="duty-cycle", window_ms=50, period_ms=500, include=("httpd",))
        >>> Policy.from_dict(p.to_dict()) == p
        True
        """
        return {
            "version": POLICY_VERSION,
            "mode": self.mode,
            "window_ms": self.window_ms,
            "period_ms": self.period_ms,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "include_calls": list(self.include_calls),
            "exclude_calls": list(self.exclude_calls),
            "max_events_per_s": self.max_events_per_s,
        }

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file: TOML if it ends in ``.toml``, JSON otherwise."""
        path = Path(path)
        if path.suffix != ".toml":
            return cls.from_dict(read_json(path, "policy"), where=str(path))
        try:
            data: Any = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InputError(f"cannot read the policy: {exc.strerror or exc}", where=path) from exc
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"not TOML: {exc}", where=path) from exc
        return cls.from_dict(data, where=str(path))


class Sampler:
    """The policy's clock: when the trap is armed, and which events are kept.

    The tracer asks :meth:`armed` (cheap) to know whether its trap should be in place now, and
    :meth:`next_change` for the time until that answer changes, so it can sleep or wait exactly that
    long; it passes each trapped event's program name to :meth:`admit`. Times are nanoseconds on any
    monotonic clock (``time.monotonic_ns``).

    >>> s = Sampler(Policy(mode="duty-cycle", window_ms=10, period_ms=100), start_ns=0)
    >>> s.armed(5_000_000), s.armed(50_000_000), s.armed(105_000_000)
    (True, False, True)
    >>> s.next_change(5_000_000)
    10000000
    >>> c = Sampler(Policy(max_events_per_s=2), start_ns=0)
    >>> [c.admit("sh", t) for t in (1, 2, 3, 1_000_000_001)]
    [True, True, False, True]
    >>> c.capped, c.filtered
    (1, 0)
    >>> f = Sampler(Policy(exclude_calls=("futex",)), start_ns=0)
    >>> f.admit("sh", 1, nr=202), f.admit("sh", 2, nr=0), f.filtered
    (False, True, 1)
    """

    def __init__(self, policy: Policy, start_ns: int) -> None:
        self.policy = policy
        self.start_ns = start_ns
        self._window = int(policy.window_ms * 1e6)
        self._period = int(policy.period_ms * 1e6)
        self._cap = policy.max_events_per_s
        self._second = -1
        self._in_second = 0
        #: Events dropped by the program filter, and by the per-second cap.
        self.filtered = 0
        self.capped = 0

    def armed(self, now_ns: int) -> bool:
        """Whether the trap should be in place at ``now_ns``."""
        if self._cap is not None and self._in_second >= self._cap and self._second_of(now_ns) == self._second:
            return False
        if self.policy.mode == "full":
            return True
        return (now_ns - self.start_ns) % self._period < self._window

    def next_change(self, now_ns: int) -> int | None:
        """The time (ns, same clock) at which :meth:`armed` may change, or ``None`` for never."""
        changes = []
        if self._cap is not None and self._in_second >= self._cap and self._second_of(now_ns) == self._second:
            changes.append(self.start_ns + (self._second + 1) * 1_000_000_000)
        if self.policy.mode != "full":
            phase = (now_ns - self.start_ns) % self._period
            changes.append(now_ns - phase + (self._window if phase < self._window else self._period))
        # The earliest possible change: waking early only costs the caller one more look.
        return min(changes) if changes else None

    def _second_of(self, now_ns: int) -> int:
        return (now_ns - self.start_ns) // 1_000_000_000

    def admit(self, comm: str, now_ns: int, nr: int | None = None) -> bool:
        """Whether to keep an event of program ``comm`` (system call ``nr``, if given) trapped at
        ``now_ns``; counts what it drops (the program and call filters in :attr:`filtered`)."""
        if not self.policy.wants(comm) or (nr is not None and not self.policy.wants_call(nr)):
            self.filtered += 1
            return False
        if self._cap is None:
            return True
        second = self._second_of(now_ns)
        if second != self._second:
            self._second, self._in_second = second, 0
        if self._in_second >= self._cap:
            self.capped += 1
            return False
        self._in_second += 1
        return True
