"""Recording the Debian guest: normal runs and attack runs, traced whole, written as a data set.

A *run* is the small-server workload (:class:`~vims.collector.guest.workload.Workload`) played for a
number of seconds while :class:`~vims.collector.tracer.SyscallTracer` traces the guest; an *attack
run* also plays one attack scenario (``vims.collector.guest.attacks``), started at a moment drawn
from the run's seed inside the first half of the run. Tracing starts before the workload and ends
:data:`TAIL_S` after both the workload and the attack have ended, so it covers the whole run. After
an attack run the scenario is undone (``reset``) with tracing off.

Each run goes to ``OUT/<run-id>/``: ``events.parquet``, ``truth.json`` (the attack's ground truth, a
list; empty for a normal run) and ``run.json``; ``OUT/manifest.json`` lists the runs, rewritten
after each one. The layout and every field: ``docs/datasets.md``. A run whose guest dies, whose
attack fails or whose truth matches no traced process is marked ``failed`` with the reason, and what
was traced is kept; the recording goes on with the next run unless the guest is gone.
:func:`vims.datasets.recorded.read_recording` reads a recording back as one labelled trace table.

Use::

    knobs = Knobs(normal_runs=2, seconds=60.0)
    manifest = record(Guest.attach("vims-guest"), Path("rec"), knobs)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vims.datasets.recorded import EVENTS, FORMAT, MANIFEST, RUN, TRUTH
from vims.errors import InputError, VimsError
from vims.paths import cache_dir

if TYPE_CHECKING:
    from vims.collector.guest.qemu import Guest

__all__ = ["SMALL_KNOBS", "Knobs", "Play", "RecordingError", "RunSpec", "Scenario", "cached", "cached_recording",
           "default_folder", "image_key", "play_run", "record", "recording", "running_guest",
           "scenarios_from_attacks", "standard_knobs"]  # fmt: skip

#: Bump when recordings change in a way the knobs do not show (the cache key holds it).
RECORDING_VERSION = 1
#: Seconds traced after the workload and the attack have both ended (their last calls, exits).
TAIL_S = 3.0
#: Seconds traced before the workload starts (the traps are armed by then).
LEAD_S = 1.0
#: The longest an attack may run past the end of its run's workload before the run fails.
ATTACK_LIMIT_S = 900.0
#: The longest round of the workload (:func:`_workload`).
ROUND_S = 60.0
#: What may trace a recording (:class:`Knobs`).
TRACERS = ("gdb", "plugin")
#: A scenario: ``(guest, seed, log) -> ground truth`` (an object with ``to_json()``, or its dict).
Scenario = Callable[["Guest", int, Callable[[str], None] | None], Any]


class RecordingError(VimsError):
    """A recording ended with failed runs (each one's reason is in its ``run.json``)."""


@dataclass(frozen=True)
class RunSpec:
    """One run to record: its id, kind, seed and length (an attack run: its scenario)."""

    run_id: str
    kind: str  # normal | attack
    seed: int
    seconds: float
    scenario: str | None = None
    long: bool = False


@dataclass(frozen=True)
class Knobs:
    """What a recording holds: ``normal_runs`` runs of ``seconds`` each, one long normal run of ``hours``
    (if given), and one attack run of ``seconds`` per scenario, the workload at ``rate`` actions/s,
    traced by ``tracer``: ``gdb`` (the GDB stub's watchpoint tracer, on any QEMU; it misses calls under
    load) or ``plugin`` (QEMU 10's TCG plugin: every call; the guest must run with it, ``plugin=True``)."""

    normal_runs: int = 2
    seconds: float = 60.0
    hours: float | None = None
    scenarios: tuple[str, ...] = ()
    seed: int = 0
    rate: float = 0.5
    tracer: str = "gdb"

    def check(self) -> None:
        """Raise :class:`InputError` for knobs no recording can have."""
        if self.normal_runs < 0:
            raise InputError(f"--normal-runs {self.normal_runs}: zero or more")
        if not math.isfinite(self.seconds) or self.seconds < 5:
            raise InputError(f"--seconds {self.seconds:g}: at least 5 seconds per run")
        if self.hours is not None and (not math.isfinite(self.hours) or self.hours <= 0):
            raise InputError(f"--hours {self.hours:g}: a positive number")
        if not math.isfinite(self.rate) or self.rate <= 0:
            raise InputError(f"--rate {self.rate:g}: actions per second must be a positive number")
        if len(set(self.scenarios)) != len(self.scenarios):
            raise InputError("a scenario is named twice")
        if self.tracer not in TRACERS:
            raise InputError(f"--tracer {self.tracer}: one of {', '.join(TRACERS)}")
        if not self.runs():
            raise InputError("nothing to record: no normal run, no long run and no scenario")

    def runs(self) -> list[RunSpec]:
        """The runs in recording order: normal runs, the long run, then one attack run per scenario."""
        runs = [RunSpec(f"normal-{i}", "normal", self.seed + i, self.seconds) for i in range(self.normal_runs)]
        if self.hours is not None:
            runs.append(RunSpec("normal-long", "normal", self.seed + 1000, self.hours * 3600.0, long=True))
        runs += [RunSpec(f"attack-{name}", "attack", self.seed + 2000 + i, self.seconds, scenario=name)
                 for i, name in enumerate(self.scenarios)]
        return runs

    def key(self, image: str) -> str:
        """The cache key of a recording of these knobs on the image with key ``image``."""
        data = {"image": image, "version": RECORDING_VERSION, **dataclasses.asdict(self)}
        if self.tracer == "gdb":  # the keys of recordings made before the knob existed stay as they were
            del data["tracer"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


#: A small recording (2 normal runs of 25 s, 1 attack): smoke runs (``bench_detection.py --quick``, the
#: notebooks in the test suite) share it through the cache.
SMALL_KNOBS = Knobs(normal_runs=2, seconds=25.0, scenarios=("reverse-shell",))


def standard_knobs(hours: float | None = None) -> Knobs:
    """The recording the figures are measured on: 4 normal runs of 90 s and every attack scenario."""
    from vims.collector.guest.attacks import SCENARIOS

    return Knobs(normal_runs=4, seconds=90.0, hours=hours, scenarios=tuple(SCENARIOS))


def image_key(guest: Guest) -> str:
    """The build key of the guest's image (``build.json``), or its folder's name if it has none."""
    return _folder_key(Path(guest.state.get("image", "")))


def _folder_key(folder: Path) -> str:
    from vims.collector.guest.debian import DebianImage

    return str(DebianImage.at(folder).info.get("key") or folder.name)


def default_folder(guest: Guest, knobs: Knobs) -> Path:
    """Where a recording of ``knobs`` on ``guest``'s image is cached: ``datasets/vims-debian/<key>``."""
    return _cache_folder(image_key(guest), knobs)


def _cache_folder(image: str, knobs: Knobs) -> Path:
    return cache_dir("datasets", "vims-debian") / knobs.key(image)


def scenarios_from_attacks(names: tuple[str, ...] | None = None) -> dict[str, Scenario]:
    """The attack scenarios of :mod:`vims.collector.guest.attacks` by name (``names``: those only;
    None: all of them, or none when that module is not there)."""
    try:
        from vims.collector.guest import attacks
    except ImportError as exc:
        if not names:
            return {}
        raise InputError(f"the attack scenarios are not available ({exc})") from None
    unknown = [n for n in names or () if n not in attacks.SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario {unknown[0]!r}: one of {', '.join(attacks.SCENARIOS)}")

    def play(name: str) -> Scenario:
        return lambda guest, seed, log: attacks.run_scenario(guest, name, seed=seed, log=log)

    return {name: play(name) for name in (list(attacks.SCENARIOS) if names is None else names)}


@contextlib.contextmanager
def running_guest(name: str, log: Callable[[str], None] | None = None, plugin: bool = False) -> Iterator[Guest]:
    """The detached guest ``name`` if it runs; else a Debian guest booted for the block and stopped after
    (``plugin``: with the QEMU syscall plugin, for recordings traced by it)."""
    from vims.collector.guest.debian import build_debian
    from vims.collector.guest.qemu import Guest

    if name in Guest.detached():
        guest = Guest.attach(name)
        if guest.running:
            yield guest
            return
    if log is not None:
        log(f"no guest {name!r} runs: booting one for the recording")
    with Guest.start(build_debian(log=log), name=name, plugin=plugin) as guest:
        yield guest


def _truth_dict(truth: Any, vm_id: str) -> dict[str, Any]:
    """A scenario's ground truth as the JSON object of ``truth.json`` (checked; ``vm`` the run's vm id)."""
    from vims.datasets.truth import Truth

    data = truth.to_json() if hasattr(truth, "to_json") else truth
    if isinstance(data, str):
        data = json.loads(data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    data = {**dict(data), "vm": vm_id}
    Truth.from_dict(data, where="the scenario's ground truth")
    return data


@dataclass
class Play:
    """What the threads of one run produced: the workload's result, the attack's truth (as the JSON
    object of ``truth.json``), the attack's moment and each side's error."""

    workload: Any = None
    workload_error: str = ""
    truth: dict[str, Any] | None = None
    attack_error: str = ""
    attack_at_s: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _workload(guest: Guest, spec: RunSpec, rate: float, stop: threading.Event) -> Any:
    """The run's workload, played in rounds of at most :data:`ROUND_S` until its seconds have passed.

    Under tracing an action can take longer than the plan allows (an ssh login 5-15 s under TCG on
    a loaded machine); in rounds, a backlog delays the run's end by at most one round's, however long
    the run. Round 0 has the run's seed, round ``k`` one drawn from it. Returns the rounds' results
    as one :class:`~vims.collector.guest.workload.WorkloadResult`.
    """
    from vims.collector.guest.workload import Workload, WorkloadResult

    total = WorkloadResult(spec.seed, rate, spec.seconds)
    began = time.monotonic()
    for k in itertools.count():
        left = spec.seconds - (time.monotonic() - began)
        if left <= 0.5 or stop.is_set():
            break
        seed = spec.seed if k == 0 else random.Random(f"{spec.seed}:{k}").randrange(2**31)
        done = Workload(guest, seed=seed, rate=rate).run(min(ROUND_S, left))
        total.results += done.results
    total.elapsed = time.monotonic() - began
    return total


def _play(guest: Guest, spec: RunSpec, rate: float, scenario: Scenario | None, play: Play,
          stop: threading.Event, log: Callable[[str], None] | None) -> None:
    """The run's life: the workload, the attack at its moment, then the tail; sets ``stop`` at the end."""
    def attack() -> None:
        assert scenario is not None and play.attack_at_s is not None
        if stop.wait(play.attack_at_s):
            return
        try:
            play.truth = _truth_dict(scenario(guest, spec.seed, log), guest.name)
        except Exception as exc:  # a failed attack fails its run, whatever raised
            play.attack_error = f"scenario {spec.scenario} failed: {exc}".splitlines()[0][:400]

    try:
        if stop.wait(LEAD_S):
            return
        attacker = None
        if scenario is not None:
            play.attack_at_s = round(random.Random(spec.seed).uniform(0.1, 0.5) * spec.seconds, 3)
            attacker = threading.Thread(target=attack, name=f"attack-{spec.scenario}", daemon=True)
            attacker.start()
        try:
            play.workload = _workload(guest, spec, rate, stop)
        except Exception as exc:  # kept: the run fails with it
            play.workload_error = f"workload failed: {exc}".splitlines()[0][:400]
        if attacker is not None:
            attacker.join(ATTACK_LIMIT_S)
            if attacker.is_alive():
                play.attack_error = f"scenario {spec.scenario} did not end within {ATTACK_LIMIT_S:g} s"
        stop.wait(TAIL_S)
    finally:
        play.done.set()
        stop.set()


def play_run(guest: Guest, spec: RunSpec, rate: float, scenario: Scenario | None = None,
             log: Callable[[str], None] | None = None) -> Play:
    """Play one run on ``guest`` without tracing it: the workload for ``spec.seconds`` at ``rate``, and
    ``scenario`` (if given) from its seeded moment (``vims guest scenario --during-workload``)."""
    play = Play()
    _play(guest, spec, rate, scenario, play, threading.Event(), log)
    return play


@contextlib.contextmanager
def _gate_service(guest: Guest) -> Iterator[bool]:
    """The protected service on the guest's gate port while recording (the workload's client talks to
    it); nothing if something already listens there. Yields whether it runs."""
    from vims.remote.service import start_line_service

    # the service's event loop lives in its own thread from start to close, so that a caller that runs
    # a loop of its own (a notebook's kernel) can record too
    loop = asyncio.new_event_loop()
    started: queue.Queue[Any] = queue.Queue()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(start_line_service("127.0.0.1", guest.gate_address[1]))
        except OSError:
            loop.close()
            started.put(None)
            return
        started.put(server)
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=serve, name="gate-service", daemon=True)
    thread.start()
    if started.get() is None:
        thread.join(10)
        yield False
        return
    try:
        yield True
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _trace_run(guest: Guest, spec: RunSpec, rate: float, scenario: Scenario | None, interrupted: threading.Event,
               progress: Callable[[dict[str, Any]], Any] | None,
               log: Callable[[str], None] | None, method: str = "gdb") -> tuple[Any, Play, float]:
    """Trace one run from start to end: (the tracer's result, what the run's threads produced, start)."""
    from vims.collector.backends.qemu import QemuBackend
    from vims.collector.tracer import SyscallTracer

    play, stop = Play(), threading.Event()
    started = time.time()
    backend = QemuBackend.from_guest(guest)
    with backend:
        tracer: Any
        if method == "plugin":  # record() checked that the guest runs with the plugin
            from vims.collector.plugin_tracer import PluginTracer

            tracer = PluginTracer(backend, guest.name)
        else:
            tracer = SyscallTracer(backend, guest.name)
        driver = threading.Thread(target=_play, args=(guest, spec, rate, scenario, play, stop, log),
                                  name=f"run-{spec.run_id}", daemon=True)

        def look(p: dict[str, Any]) -> None:  # the tracer calls it twice a second
            if interrupted.is_set():
                stop.set()
            if progress is not None:
                progress(p)

        driver.start()
        limit = LEAD_S + spec.seconds + ATTACK_LIMIT_S + TAIL_S + 60.0
        result = tracer.run(duration=limit, stop=stop, progress=look)
    stop.set()
    # the workload's actions end within their own timeout; a gone guest's fail at once, but the plan
    # runs on to its end (the process does not wait for it)
    driver.join(120.0 if guest.running and not interrupted.is_set() else 5.0)
    return result, play, started


def _status(guest: Guest, spec: RunSpec, result: Any, play: Play, interrupted: bool) -> tuple[str, str | None]:
    """``(ok|failed, reason)`` of a traced run."""
    from vims.datasets.truth import Truth, attack_marks

    if interrupted:
        return "failed", "interrupted by the user"
    if result.reason not in ("interrupted", "duration") or not guest.running:
        return "failed", f"the guest went away: {result.reason}"
    if result.reason == "duration":
        return "failed", "the run did not end within its time limit"
    if not play.done.is_set():
        return "failed", "the run's workload did not end"
    for error in (play.workload_error, play.attack_error):
        if error:
            return "failed", error
    if spec.kind == "attack":
        if play.truth is None:
            return "failed", f"scenario {spec.scenario} gave no ground truth"
        try:
            attack_marks(result.events, [Truth.from_dict(play.truth)], where=TRUTH)
        except InputError as exc:
            return "failed", str(exc)
    return "ok", None


def _run_info(guest: Guest, spec: RunSpec, rate: float, result: Any, play: Play, started: float,
              status: tuple[str, str | None]) -> dict[str, Any]:
    """What ``run.json`` says of a run (``docs/datasets.md`` lists the fields)."""
    return {
        "run_id": spec.run_id, "kind": spec.kind, "long": spec.long, "scenario": spec.scenario,
        "family": (play.truth or {}).get("family"), "status": status[0], "reason": status[1],
        "seed": spec.seed, "rate": rate, "duration_s": spec.seconds, "attack_at_s": play.attack_at_s,
        "started_ns": int(started * 1e9), "ended_ns": time.time_ns(), "vm_id": guest.name,
        "events": result.events.num_rows,
        "workload": play.workload.as_dict() if play.workload is not None else None,
        "tracer": {"method": result.method, "reason": result.reason, "stats": result.stats},
        "guest": {"name": guest.name, "image_key": image_key(guest), "release": guest.state.get("release"),
                  "image": guest.state.get("image"), "accel": guest.state.get("accel"),
                  "smp": guest.state.get("smp"), "memory_mb": guest.state.get("memory_mb")},
    }  # fmt: skip


def _record_run(guest: Guest, folder: Path, spec: RunSpec, rate: float, scenario: Scenario | None,
                interrupted: threading.Event, progress: Callable[[dict[str, Any]], Any] | None,
                log: Callable[[str], None] | None, method: str = "gdb") -> dict[str, Any]:
    """Record one run into ``folder`` (events, truth, run.json); returns its ``run.json``."""
    from vims.tables import write_table

    result, play, started = _trace_run(guest, spec, rate, scenario, interrupted, progress, log, method)
    status = _status(guest, spec, result, play, interrupted.is_set())
    info = _run_info(guest, spec, rate, result, play, started, status)
    if spec.kind == "attack" and guest.running:
        info["reset"] = _reset(guest)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(result.events, folder / EVENTS)
    _write_json(folder / TRUTH, [play.truth] if play.truth is not None else [])
    _write_json(folder / RUN, info)
    return info


def _reset(guest: Guest) -> str:
    """Undo every scenario (with tracing off); ``"ok"`` or the error."""
    try:
        from vims.collector.guest.attacks import reset
    except ImportError:
        return "no attacks module"
    try:
        reset(guest)
    except Exception as exc:  # kept in run.json: the next run starts from a guest not quite clean
        return f"failed: {exc}".splitlines()[0][:300]
    return "ok"


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    from vims.console import to_json

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_json(data) + "\n")
    tmp.replace(path)


def _manifest(guest: Guest, knobs: Knobs, runs: list[dict[str, Any]], began: float) -> dict[str, Any]:
    """``manifest.json``: the knobs, the guest and a line per run recorded so far."""
    keys = ("run_id", "kind", "long", "scenario", "family", "status", "reason", "seed", "duration_s", "events",
            "started_ns", "ended_ns")
    failed = [r for r in runs if r["status"] != "ok"]
    return {
        "format": FORMAT, "version": RECORDING_VERSION, "key": knobs.key(image_key(guest)),
        "knobs": {**dataclasses.asdict(knobs), "scenarios": list(knobs.scenarios)},
        "complete": len(runs) == len(knobs.runs()) and not failed,
        "elapsed_s": round(time.time() - began, 1),
        "guest": {"name": guest.name, "image_key": image_key(guest), "release": guest.state.get("release")},
        "runs": [{k: r.get(k) for k in keys} for r in runs],
    }  # fmt: skip


def cached(folder: Path, guest: Guest, knobs: Knobs) -> dict[str, Any] | None:
    """The manifest of a complete recording of ``knobs`` on this image in ``folder``, or None."""
    return _complete(folder, knobs.key(image_key(guest)))


def _complete(folder: Path, key: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    fits = isinstance(manifest, dict) and manifest.get("key") == key
    return manifest if fits and manifest.get("complete") else None


def recording(guest: Guest, knobs: Knobs, scenarios: Mapping[str, Scenario] | None = None,
              progress: Callable[[RunSpec, int, dict[str, Any]], Any] | None = None) -> Path:
    """The cached recording of ``knobs`` on ``guest``'s image (:func:`default_folder`), recorded first if
    the cache does not hold it complete: what tests and benchmarks call."""
    folder = default_folder(guest, knobs)
    if cached(folder, guest, knobs) is None:
        record(guest, folder, knobs, scenarios, progress=progress, force=True)
    return folder


def cached_recording(knobs: Knobs, name: str, scenarios: Mapping[str, Scenario] | None = None,
                     progress: Callable[[RunSpec, int, dict[str, Any]], Any] | None = None,
                     log: Callable[[str], None] | None = None) -> Path:
    """The cached recording of ``knobs`` on the Debian image, recorded first if the cache lacks it.

    No guest is needed when the cache holds the recording complete: the image (built first if it is
    not, :func:`~vims.collector.guest.debian.build_debian`) keys it. Otherwise the recording is made on
    the running guest ``name``, or on one booted for it (:func:`running_guest`). What notebooks and
    benchmarks call.
    """
    from vims.collector.guest.debian import build_debian

    image = _folder_key(build_debian(log=log).directory)
    folder = _cache_folder(image, knobs)
    if _complete(folder, knobs.key(image)) is not None:
        if log is not None:
            log(f"recording found in the cache: {folder}")
        return folder
    with running_guest(name, log=log, plugin=knobs.tracer == "plugin") as guest:
        return recording(guest, knobs, scenarios, progress=progress)


def _prepare(folder: Path, force: bool) -> None:
    """Make ``folder`` ready for a new recording: empty, or an earlier recording (replaced)."""
    if folder.exists() and not folder.is_dir():
        raise InputError("is a file; name a folder for the recording", where=folder)
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MANIFEST).is_file() and not force:
            raise InputError("holds files that are not a recording; name another folder (or --force)",
                             where=folder)
        for child in folder.iterdir():
            if (child.is_dir() and (child / RUN).exists()) or child.name in (MANIFEST, f".{MANIFEST}.tmp"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def record(guest: Guest, folder: Path, knobs: Knobs, scenarios: Mapping[str, Scenario] | None = None,
           progress: Callable[[RunSpec, int, dict[str, Any]], Any] | None = None,
           log: Callable[[str], None] | None = None, force: bool = False) -> dict[str, Any]:
    """Record ``knobs.runs()`` on the running Debian ``guest`` into ``folder``; returns the manifest.

    Parameters
    ----------
    guest : Guest
        A running Debian guest.
    folder : Path
        Where the recording goes (empty, or an earlier recording, which is replaced).
    knobs : Knobs
        The runs; ``knobs.scenarios`` are looked up in ``scenarios``.
    scenarios : mapping, optional
        Scenario callables by name (default: :func:`scenarios_from_attacks`).
    progress : callable, optional
        Called with ``(run, index, tracer progress)`` about twice a second.
    log : callable, optional
        Given to the scenarios for their notes.
    force : bool
        Record into a folder that holds other files.

    Raises
    ------
    RecordingError
        When a run failed (after the manifest is written; the runs' folders keep what was traced).
    """
    knobs.check()
    if guest.kind != "debian":
        raise InputError(f"guest {guest.name!r} is not a Debian guest (`vims guest up --image debian`)")
    plays = dict(scenarios) if scenarios is not None else scenarios_from_attacks(knobs.scenarios)
    missing = [n for n in knobs.scenarios if n not in plays]
    if missing:
        raise InputError(f"unknown scenario {missing[0]!r}: one of {', '.join(plays) or '(none)'}")
    if knobs.tracer == "plugin" and getattr(guest, "plugin_shm", None) is None:
        raise InputError(f"the guest {guest.name!r} runs without the QEMU syscall plugin: a recording traced "
                         "by it needs a guest started with it (vims guest up --tracer plugin)")
    _prepare(folder, force)
    began, runs, interrupted = time.time(), [], threading.Event()
    with _gate_service(guest), _sigint(interrupted):
        for index, spec in enumerate(knobs.runs()):
            show = None if progress is None else (lambda p, s=spec, i=index: progress(s, i, p))
            scenario = plays[spec.scenario] if spec.scenario else None
            runs.append(_record_run(guest, folder / spec.run_id, spec, knobs.rate, scenario, interrupted, show,
                                    log, knobs.tracer))
            manifest = _manifest(guest, knobs, runs, began)
            _write_json(folder / MANIFEST, manifest)
            if not guest.running or interrupted.is_set():
                break
    failed = [r for r in runs if r["status"] != "ok"]
    if failed or len(runs) < len(knobs.runs()):
        first = failed[0] if failed else runs[-1]
        raise RecordingError(f"{len(failed)} of {len(knobs.runs())} runs failed, {len(knobs.runs()) - len(runs)} "
                             f"not recorded; {first['run_id']}: {first['reason']} (see {folder / MANIFEST})")
    return manifest


@contextlib.contextmanager
def _sigint(interrupted: threading.Event) -> Iterator[None]:
    """Ctrl-C ends the current run (marked failed, its events kept) and the recording; twice: at once."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
