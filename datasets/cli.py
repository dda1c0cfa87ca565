"""``vims datasets``: import public trace data sets and our own captures, and summarise trace files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vims.console import out, print_json

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
    truths = read_truths(p / TRUTH if p.is_dir() else p for p in truth)
    table = read_table(events, EVENT_SCHEMA)
    _write(traces_from_events(table, label=label, split=split, family=family, where=str(events), truths=truths),
           output, as_json)


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
