"""A workload that resembles a small server, played on the Debian guest: seeded, repeatable, with a rate.

Kinds of action (:data:`KINDS`), driven from the host (web, ssh) and from inside the guest (the rest,
each run over an ssh login as root, the way an administrator's tooling would):

- ``http-static``: a static page through the http ``hostfwd``; the answer must be the page's bytes;
- ``http-php``: a PHP page (some with a query) through the same port; the answer must carry its marker;
- ``ssh-login``: a login of one of the guest's users with the workload key, running an ordinary command;
- ``cron-job``: one of the server's cron jobs (:data:`~vims.collector.guest.debian.CRON_JOBS`), run as
  its user as cron runs it (cron also runs them by itself every minute or five);
- ``logrotate``: a forced rotation of the site's logs (logrotate's timer and a cron entry run it too);
- ``package-query``: a package-database query (``dpkg -l``, ``dpkg -S``, ``apt-cache policy``...);
- ``gate-client``: the client software (netcat) connecting from inside the guest to the protected
  service through REM-S's gate, at the intranet address the guest's ``guestfwd`` maps to the gate port;
  it sends a line and ``quit`` and must get an answer that is not a refusal (``VIMS DENY``/``VIMS CUT``).

:func:`plan` turns a seed, a rate (actions per second) and a duration into the list of actions with
their start times: the first round holds every kind once (in a seeded order), then kinds are drawn by
:data:`WEIGHTS`; gaps are exponential (a Poisson process at the rate). Same seed, same plan.
:class:`Workload` plays a plan on a guest, starting each action at its time on a small pool of workers
(an action that takes longer than the gap delays no other), and counts every outcome: a failed action
is kept with its error, never dropped.

>>> [(a.kind, a.detail) for a in plan(seed=1, rate=2.0, duration=3.0)][:2]
[('cron-job', ('site-health',)), ('gate-client', ('HELLO 1',))]
"""

from __future__ import annotations

import math
import random
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vims.collector.guest.debian import CRON_JOBS, LOGROTATE_COMMAND, PHP_PAGES, STATIC_PAGES, USERS, WORKLOAD_USER
from vims.errors import InputError, VimsError

if TYPE_CHECKING:
    from vims.collector.guest.qemu import Guest

__all__ = ["KINDS", "WEIGHTS", "Action", "ActionResult", "Workload", "WorkloadResult", "check_knobs", "plan"]

KINDS = ("http-static", "http-php", "ssh-login", "cron-job", "logrotate", "package-query", "gate-client")
#: How often each kind is drawn after the first round (relative weights).
WEIGHTS = {
    "http-static": 4.0, "http-php": 3.0, "ssh-login": 2.0, "cron-job": 1.0, "logrotate": 0.3,
    "package-query": 1.0, "gate-client": 1.0,
}  # fmt: skip
SSH_COMMANDS = (
    "uptime", "df -h /", "free -m", "ps aux --sort=-%cpu | head -n 5", "ls -la /var/log",
    "tail -n 5 /var/log/vims-site/health.log", "who", "cat /etc/os-release", "pgrep -c nginx",
    "date >> ~/.workload_history && wc -l ~/.workload_history", "php -r 'echo phpversion(), PHP_EOL;'",
    "grep -c processor /proc/cpuinfo",
)  # fmt: skip
PACKAGE_QUERIES = (
    "dpkg -l", "dpkg -S /usr/sbin/nginx", "apt-cache policy nginx-light", "dpkg -L openssh-server",
    "dpkg-query -W -f='${Package} ${Version}\\n' php8.2-fpm cron", "apt-cache show --no-all-versions curl",
)  # fmt: skip
SEARCH_WORDS = ("ng", "php", "cron", "deb", "s", "kernel", "backup", "x")
#: The answers of a gate that refused or cut the connection (:mod:`vims.remote.gate`).
GATE_REFUSALS = ("VIMS DENY", "VIMS CUT")


@dataclass(frozen=True)
class Action:
    """One planned action: when it starts (seconds after the workload's start), its kind and its arguments."""

    at: float
    kind: str
    detail: tuple[str, ...]


@dataclass
class ActionResult:
    """What became of one action: when it really started, how long it took, and its outcome or error."""

    index: int
    action: Action
    started: float
    seconds: float
    ok: bool
    outcome: str = ""
    error: str = ""


def check_knobs(rate: float, duration: float | None = None, workers: int = 4) -> None:
    """Raise :class:`InputError` (one line) for a rate, duration or worker count the workload cannot use."""
    if not math.isfinite(rate) or rate <= 0:
        raise InputError(f"rate {rate:g}: actions per second must be a positive number")
    if duration is not None and (not math.isfinite(duration) or duration <= 0):
        raise InputError(f"duration {duration:g}: seconds must be a positive number")
    if workers < 1:
        raise InputError(f"workers {workers}: at least one")


def _detail(kind: str, index: int, rng: random.Random) -> tuple[str, ...]:
    """The arguments of an action of ``kind`` (drawn from ``rng``; the same draws for the same seed)."""
    if kind == "http-static":
        return ("/" + rng.choice(sorted(STATIC_PAGES)),)
    if kind == "http-php":
        page = rng.choice(sorted(PHP_PAGES))
        if page == "search.php":
            return (f"/search.php?q={rng.choice(SEARCH_WORDS)}",)
        return (f"/api.php?n={rng.randint(1, 20)}",) if page == "api.php" else (f"/{page}",)
    if kind == "ssh-login":
        return (rng.choice((*USERS, WORKLOAD_USER)), rng.choice(SSH_COMMANDS))
    if kind == "cron-job":
        return (rng.choice(sorted(name for name in CRON_JOBS if name != "logrotate")),)
    if kind == "package-query":
        return (rng.choice(PACKAGE_QUERIES),)
    if kind == "gate-client":
        return (f"HELLO {index}",)
    return ()


def plan(seed: int = 0, rate: float = 2.0, duration: float = 60.0) -> list[Action]:
    """The actions of a run of ``duration`` seconds at ``rate`` actions per second, from ``seed``.

    Starts are a Poisson process at ``rate`` (the first action at 0); the first round holds every kind
    of :data:`KINDS` once, in an order drawn from the seed; after it kinds are drawn by :data:`WEIGHTS`.
    """
    check_knobs(rate, duration)
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    actions: list[Action] = []
    at = 0.0
    while at < duration:
        index = len(actions)
        kind = first[index] if index < len(first) else rng.choices(kinds, weights)[0]
        actions.append(Action(round(at, 3), kind, _detail(kind, index, rng)))
        at += rng.expovariate(rate)
    return actions


@dataclass
class WorkloadResult:
    """A played workload: its knobs and every action's result, in plan order."""

    seed: int
    rate: float
    duration: float
    results: list[ActionResult] = field(default_factory=list)
    elapsed: float = 0.0

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind of action, how many succeeded (``ok``) and failed (``failed``)."""
        counts = {kind: {"ok": 0, "failed": 0} for kind in KINDS}
        for r in self.results:
            counts[r.action.kind]["ok" if r.ok else "failed"] += 1
        return counts

    def failures(self) -> list[ActionResult]:
        """The actions that failed, each with its error."""
        return [r for r in self.results if not r.ok]

    def as_dict(self) -> dict[str, Any]:
        """What ``vims guest workload --json`` prints."""
        lags = [max(0.0, r.started - r.action.at) for r in self.results]
        return {
            "seed": self.seed, "rate": self.rate, "duration": self.duration, "actions": len(self.results),
            "ok": sum(r.ok for r in self.results), "failed": len(self.failures()), "counts": self.counts(),
            "failures": [{"index": r.index, **asdict(r.action), "error": r.error} for r in self.failures()],
            "elapsed_s": round(self.elapsed, 2),
            "actions_per_s": round(len(self.results) / self.elapsed, 3) if self.elapsed else 0.0,
            "max_lag_s": round(max(lags, default=0.0), 2),
            "mean_action_s": round(sum(r.seconds for r in self.results) / max(1, len(self.results)), 3),
        }  # fmt: skip


class _ActionFailedError(VimsError):
    pass


class Workload:
    """The small-server workload on one running Debian guest.

    Parameters
    ----------
    guest : Guest
        A running Debian guest (``Guest.start(build_debian())`` or ``Guest.attach(name)``).
    seed : int
        Seeds the plan: the same seed gives the same actions at the same planned times.
    rate : float
        Actions per second (the mean of a Poisson process).
    workers : int
        Actions that may run at once (a full ssh login under TCG takes about 2 s).
    timeout : float
        Seconds one action may take before it counts as failed.

    Examples
    --------
    >>> result = Workload(guest, seed=0, rate=2.0).run(30)  # doctest: +SKIP
    >>> result.counts()["http-static"], result.failures()  # doctest: +SKIP
    ({'ok': 14, 'failed': 0}, [])
    """

    def __init__(self, guest: Guest, seed: int = 0, rate: float = 2.0, workers: int = 4, timeout: float = 60.0) -> None:
        check_knobs(rate, workers=workers)
        if guest.kind != "debian" or guest.http_address is None:
            raise InputError(f"guest {guest.name!r} is not a Debian guest (`vims guest up --image debian`)")
        self.guest, self.seed, self.rate, self.workers, self.timeout = guest, seed, rate, workers, timeout

    def plan(self, duration: float) -> list[Action]:
        """The actions :meth:`run` plays in ``duration`` seconds (:func:`plan`)."""
        return plan(self.seed, self.rate, duration)

    def run(self, duration: float, on_result: Callable[[ActionResult], None] | None = None) -> WorkloadResult:
        """Play :meth:`plan` ``(duration)``: each action at its time, then wait for the last to end.

        ``on_result`` receives each result as it comes (from a worker thread, one at a time).
        """
        actions = self.plan(duration)
        result = WorkloadResult(self.seed, self.rate, duration)
        slots: list[ActionResult | None] = [None] * len(actions)
        lock = threading.Lock()
        start = 0.0

        def play(index: int, action: Action) -> None:
            done = self._play(index, action, start)
            with lock:
                slots[index] = done
                if on_result is not None:
                    on_result(done)

        start = time.monotonic()
        with ThreadPoolExecutor(self.workers, "workload") as pool:
            for index, action in enumerate(actions):
                time.sleep(max(0.0, start + action.at - time.monotonic()))
                pool.submit(play, index, action)
        result.elapsed = time.monotonic() - start
        result.results = [r for r in slots if r is not None]
        return result

    def _play(self, index: int, action: Action, start: float) -> ActionResult:
        began = time.monotonic()
        try:
            outcome, ok, error = self.perform(action), True, ""
        except VimsError as exc:
            outcome, ok, error = "", False, str(exc).splitlines()[0][:300]
        except Exception as exc:  # every failure is counted and kept, whatever raised it
            outcome, ok, error = "", False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return ActionResult(index, action, round(began - start, 3), round(time.monotonic() - began, 3), ok,
                            outcome, error)  # fmt: skip

    def perform(self, action: Action) -> str:
        """Do one action now; return a short outcome, or raise when it failed."""
        kind = action.kind
        if kind in ("http-static", "http-php"):
            return self._http(action.detail[0])
        if kind == "ssh-login":
            return self._login(*action.detail)
        if kind == "cron-job":
            _when, user, command = CRON_JOBS[action.detail[0]]
            return self._root(command if user == "root" else f"runuser -u {user} -- {command}")
        if kind == "logrotate":
            return self._logrotate()
        if kind == "package-query":
            return self._root(action.detail[0])
        if kind == "gate-client":
            return self._gate(action.detail[0])
        raise _ActionFailedError(f"unknown kind of action {kind!r}")

    def _http(self, path: str) -> str:
        assert self.guest.http_address is not None
        host, port = self.guest.http_address
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        try:
            with opener.open(f"http://{host}:{port}{path}", timeout=self.timeout) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            raise _ActionFailedError(f"GET {path}: HTTP {exc.code}") from None
        except OSError as exc:
            raise _ActionFailedError(f"GET {path}: {exc}") from None
        page = path.lstrip("/").split("?", 1)[0]
        expected = STATIC_PAGES.get(page)
        if expected is not None and body != expected.encode():
            raise _ActionFailedError(f"GET {path}: {len(body)} bytes that are not the page")
        if page in PHP_PAGES and PHP_PAGES[page][1].encode() not in body:
            raise _ActionFailedError(f"GET {path}: no {PHP_PAGES[page][1]!r} in {body[:120]!r}")
        return f"HTTP {status}, {len(body)} bytes"

    def _login(self, user: str, command: str) -> str:
        try:
            proc = subprocess.run([*self.guest.ssh_command(user), command], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=self.timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise _ActionFailedError(f"ssh {user}: {command!r} took over {self.timeout:g} s") from None
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-200:]
            raise _ActionFailedError(f"ssh {user}: {command!r} exit {proc.returncode}: {said}")
        return f"{user}: {len(proc.stdout)} bytes"

    def _inside(self, command: str) -> tuple[int, str]:
        # Guest.execute shares one root ssh connection (a login costs seconds under TCG); the
        # ``ssh-login`` actions are full logins of their own.
        return self.guest.execute(command, timeout=self.timeout)

    def _root(self, command: str) -> str:
        rc, text = self._inside(command)
        if rc != 0:
            raise _ActionFailedError(f"{command!r} exit {rc}: {text.strip()[-200:]}")
        return f"{len(text)} bytes"

    def _logrotate(self, tries: int = 3) -> str:
        """A forced rotation; cron's own run every five minutes holds logrotate's state-file lock for a
        moment, and a run that meets it ("already locked") tries again, as an administrator would."""
        program, rest = LOGROTATE_COMMAND.split(" ", 1)
        command = f"{program} --force {rest}"
        for _ in range(tries - 1):
            try:
                return self._root(command)
            except _ActionFailedError as exc:
                if "already locked" not in str(exc):
                    raise
                time.sleep(2.0)
        return self._root(command)

    def _gate(self, message: str) -> str:
        from vims.collector.guest.qemu import GATE_GUEST_ADDRESS

        host, port = GATE_GUEST_ADDRESS
        request = shlex.quote(f"{message}\nquit\n")
        rc, reply = self._inside(f"printf %s {request} | nc -w 10 {host} {port}")
        reply = reply.strip()
        if not reply:
            raise _ActionFailedError(
                f"the gate at {host}:{port} closed the connection unanswered (exit {rc}; nothing listens on "
                f"the host's gate port {self.guest.gate_address[1]}?)"
            )
        if reply.startswith(GATE_REFUSALS):
            raise _ActionFailedError(f"the gate refused: {reply.splitlines()[0][:200]}")
        return reply.splitlines()[0][:200]


