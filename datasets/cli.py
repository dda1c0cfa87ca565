"""``vims datasets``: import public trace data sets and our own captures, and summarise trace files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vims.console import err, out, print_json

datasets_app = typer.Typer(help="Import system-call data sets (ADFA-LD, UNM, VIMS captures) into Parquet "
                                "trace tables, and summarise them.", no_args_is_help=True)
import_app = typer.Typer(help="Import a data set into a Parquet trace table (one row per process trace).",
                         no_args_is_help=True)
datasets_app.add_typer(import_app, name="import")

OUTPUT = typer.Option(..., "-o", "--output", help="The Parquet trace table to write (written atomically).")
JSON = typer.Option(False, "--json", metavar="", help="Print the summary as JSON.")


def _show(summary: dict[str, Any], title: str, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    length = summary["length"]
    out.print(f"[bold]{title}[/]: {summary['traces']:,} traces, {summary['syscalls']:,} system calls "
              f"({summary['distinct_syscalls']} distinct), {summary['empty_traces']} empty; length "
              f"min {length['min']}, median {length['median']:g}, mean {length['mean']:g}, max {length['max']}",
              highlight=False)
    for column, counts in summary["by"].items():
        if list(counts) == ["(none)"]:
            continue
        table = Table(title=f"by {column}", title_justify="left", show_edge=False)
        table.add_column(column)
        table.add_column("traces", justify="right")
        for value, n in counts.items():
            table.add_row(value, f"{n:,}")
        out.print(table)
    for run in summary.get("skipped_runs", []):
        out.print(f"[yellow]left out[/] run {run['run_id']} ({run['status']}: {run['reason']})", highlight=False)


def _write(table: Any, output: Path, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    from vims.datasets.summary import summarize
    from vims.schemas import TRACE_SCHEMA
    from vims.tables import write_table

    write_table(table, output, TRACE_SCHEMA)
    summary = summarize(table) | {"output": str(output)} | (extra or {})
    _show(summary, str(output), as_json)


@import_app.command("adfa-ld")
def import_adfa_ld(
    path: Path = typer.Argument(..., help="ADFA-LD in its official layout: the folder, or the .zip holding it."),
    output: Path = OUTPUT,
    as_json: bool = JSON,
) -> None:
    """ADFA-LD: Training -> split train, Validation -> validation, Attack -> attack (family from the run)."""
    from vims.datasets.adfa import read_adfa_ld

    _write(read_adfa_ld(path, progress=True), output, as_json)


@import_app.command("unm")
def import_unm(
    path: Path = typer.Argument(..., help="A UNM program folder holding normal/ and intrusion/."),
    output: Path = OUTPUT,
    program: str = typer.Option(None, help="Program name (default: the folder's name)."),
    as_json: bool = JSON,
) -> None:
    """UNM (Forrest et al.): one trace per (file, PID), labelled by folder."""
    from vims.datasets.unm import read_unm

    _write(read_unm(path, program=program, progress=True), output, as_json)


@import_app.command("vims")
def import_vims(
    events: Path = typer.Argument(..., help="An event table written by `vims collect` (Parquet), or a folder "
                                            "recorded by `vims datasets record`."),
    output: Path = OUTPUT,
    truth: list[Path] = typer.Option([], "--truth", help="Ground truth of attacks in the capture (JSON: one "
                                     "truth or a list; repeatable, or a recorded run's folder): their "
                                     "processes' traces become label attack, split attack."),
    label: str = typer.Option("normal", help="Label of every trace: normal (a known-clean guest) or attack."),
    split: str = typer.Option(None, help="Split given to every trace (train, validation, attack)."),
    family: str = typer.Option(None, help="Attack family given to every trace."),
    include_failed: bool = typer.Option(False, "--include-failed", metavar="",
                                        help="A recorded folder: import its failed runs too."),
    as_json: bool = JSON,
) -> None:
    """A VIMS capture: events cut into per-process traces (one per task and program it runs).

    A recorded folder gives one table of every run: labels from each run's truth.json, normal runs split train/validation by run, attack runs split attack (see docs/datasets.md).
    """  # noqa: E501  (one line per paragraph: the help text is reflowed by rich)
    from vims.datasets.capture import traces_from_events
    from vims.datasets.recorded import TRUTH, is_recording, read_recording
    from vims.datasets.truth import read_truths
    from vims.errors import InputError
    from vims.schemas import EVENT_SCHEMA
    from vims.tables import read_table

    if label not in ("normal", "attack"):
        raise InputError(f"--label must be normal or attack, not {label!r}")
    if is_recording(events):
        if truth or split or family or label != "normal":
            raise InputError(f"{events} is a recording: its runs carry their labels, splits and truths "
                             "(no --truth, --label, --split or --family)")
        table, read = read_recording(events, include_failed=include_failed)
        _write(table, output, as_json, extra=read)
        return
    if events.is_dir():
        raise InputError("a folder, but not a recording (no manifest.json): name an event table or a folder "
                         "recorded by `vims datasets record`", where=events)
    truths = read_truths(p / TRUTH if p.is_dir() else p for p in truth)
    table = read_table(events, EVENT_SCHEMA)
    _write(traces_from_events(table, label=label, split=split, family=family, where=str(events), truths=truths),
           output, as_json)


@datasets_app.command("record")
def record(
    output: Path = typer.Option(None, "-o", "--output", help="The recording's folder (default: the cache, "
                                "~/.cache/vims/datasets/vims-debian/<key of image and knobs>, reused when complete)."),
    name: str = typer.Option("vims-guest", "--name", help="The running Debian guest (`vims guest up`); if none "
                             "runs, one is booted for the recording and stopped after."),
    normal_runs: int = typer.Option(2, "--normal-runs", help="Normal runs (workload only) of --seconds each."),
    seconds: float = typer.Option(60.0, "--seconds", help="Length of each normal run and each attack run."),
    hours: float = typer.Option(None, "--hours", help="Also one long normal run of this many hours "
                                "(split validation on import)."),
    scenario: list[str] = typer.Option([], "--scenario", help="An attack run of this scenario (repeatable; "
                                       "default: every scenario)."),
    no_attacks: bool = typer.Option(False, "--no-attacks", metavar="", help="Normal runs only."),
    seed: int = typer.Option(0, "--seed", help="Seeds the workloads, the scenarios and the attacks' moments."),
    rate: float = typer.Option(0.5, "--rate", help="Workload actions per second (under tracing an action "
                               "takes seconds: more overloads the guest)."),
    tracer: str = typer.Option("gdb", "--tracer", help="gdb: the GDB stub's watchpoint tracer (any QEMU; misses "
                               "calls under load); plugin: QEMU 10's TCG plugin, every call (the guest booted "
                               "for it gets the plugin; a running one needs vims guest up --tracer plugin)."),
    force: bool = typer.Option(False, "--force", metavar="", help="Record again even if the cache holds it; "
                               "record into a folder that holds other files."),
    as_json: bool = JSON,
) -> None:
    """Record the Debian guest: normal runs and one attack run per scenario, each traced whole, into
    events.parquet + truth.json + run.json per run and a manifest.json (docs/datasets.md).

    `vims datasets import vims FOLDER` turns it into a labelled trace table. A failed run (the guest died, the attack failed) is marked failed with its reason, keeps what was traced, and the command exits 1.
    """  # noqa: E501  (one line per paragraph: the help text is reflowed by rich)
    from vims.collector.guest.recording import Knobs, cached, default_folder, running_guest, scenarios_from_attacks
    from vims.errors import InputError

    if no_attacks and scenario:
        raise InputError("--no-attacks and --scenario contradict each other")
    plays = {} if no_attacks else scenarios_from_attacks(tuple(scenario) or None)
    knobs = Knobs(normal_runs, seconds, hours, tuple(plays), seed, rate, tracer)
    knobs.check()
    if not plays and not no_attacks and not as_json:
        err.print("[yellow]no attack scenarios available[/] (vims.collector.guest.attacks): normal runs only",
                  highlight=False)
    log = None if as_json else (lambda line: err.print(f"[dim]{line}[/]", highlight=False))
    with running_guest(name, log=log, plugin=tracer == "plugin") as guest:
        folder = output or default_folder(guest, knobs)
        manifest = None if force else cached(folder, guest, knobs)
        if manifest is None:
            manifest = _record(guest, folder, knobs, plays, force or output is None, log)
        elif not as_json:
            out.print(f"already recorded (same image and knobs): {folder}", highlight=False)
    _show_recording(manifest, folder, as_json)


def _record(guest: Any, folder: Path, knobs: Any, plays: dict[str, Any], force: bool, log: Any) -> dict[str, Any]:
    """Record with a progress bar over the runs' seconds."""
    from vims.collector.guest.recording import record as record_runs
    from vims.console import progress

    specs = knobs.runs()
    total = sum(s.seconds for s in specs)
    before = {s.run_id: sum(r.seconds for r in specs[:i]) for i, s in enumerate(specs)}
    with progress() as bar:
        task = bar.add_task("recording", total=total)

        def show(spec: Any, index: int, p: dict[str, Any]) -> None:
            bar.update(task, completed=before[spec.run_id] + min(p["seconds"], spec.seconds),
                       description=f"run {index + 1}/{len(specs)} {spec.run_id}: {p['events']:,} events")

        return record_runs(guest, folder, knobs, plays, progress=show, log=log, force=force)


def _show_recording(manifest: dict[str, Any], folder: Path, as_json: bool) -> None:
    from rich.table import Table

    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    summary = manifest | {"folder": str(folder), "bytes": size}
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"recording {folder}", title_justify="left", show_edge=False)
    for column in ("run", "kind", "status", "events", "seconds"):
        table.add_column(column, justify="right" if column in ("events", "seconds") else "left")
    for run in manifest["runs"]:
        table.add_row(run["run_id"], run["kind"], run["status"] if run["status"] == "ok" else
                      f"[red]{run['status']}[/]: {run['reason']}", f"{run['events']:,}", f"{run['duration_s']:g}")
    out.print(table)
    out.print(f"{len(manifest['runs'])} runs, {size / 1e6:.1f} MB, recorded in {manifest['elapsed_s']:g} s",
              highlight=False)


@datasets_app.command("info")
def info(
    file: Path = typer.Argument(..., help="A Parquet trace table written by `vims datasets import`."),
    as_json: bool = JSON,
) -> None:
    """Counts by split, label, family and program, and length statistics of a trace file."""
    from vims.datasets.summary import summarize
    from vims.schemas import TRACE_SCHEMA
    from vims.tables import read_table

    _show(summarize(read_table(file, TRACE_SCHEMA)), str(file), as_json)


@datasets_app.command("split")
def split(
    file: Path = typer.Argument(..., help="A Parquet trace table without splits (e.g. `vims datasets import unm`)."),
    output: Path = OUTPUT,
    train: float = typer.Option(0.5, help="Fraction of each program's normal traces for the train split "
                                "(the rest: validation; attacks: attack)."),
    seed: int = typer.Option(0, help="Seed of the shuffle: the same seed gives the same split."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace the splits the table has."),
    as_json: bool = JSON,
) -> None:
    """Give a data set without splits (UNM) train/validation/attack splits, per program, from a seed."""
    from vims.datasets.splits import assign_splits
    from vims.schemas import TRACE_SCHEMA
    from vims.tables import read_table

    table = assign_splits(read_table(file, TRACE_SCHEMA), train=train, seed=seed, overwrite=overwrite)
    _write(table, output, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
