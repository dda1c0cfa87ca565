"""``vims demo``: the main job on the embedded default.

For now it runs the part of the story that exists: import the public ADFA-LD data set and summarise
it, and says what is still missing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from vims.console import out, print_json
from vims.errors import MissingDependencyError
from vims.paths import datasets_dir

MISSING = [
    "the guest under QEMU with REM-S gating its client (issues 4-7)",
    "the webshell and kernel-patch story with a live view (issue 8)",
]


def demo(as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Run the main job end to end on the bundled default and summarise it."""
    from vims.datasets.adfa import read_adfa_ld
    from vims.datasets.summary import summarize
    from vims.tables import write_table

    source = datasets_dir() / "adfa-ld" / "ADFA-LD-dev.zip"
    if not source.exists():
        raise MissingDependencyError(f"ADFA-LD not found at {source}: set VIMS_DATASETS to the data sets folder")
    with tempfile.TemporaryDirectory() as tmp:
        output = write_table(read_adfa_ld(source, progress=True), Path(tmp) / "adfa.parquet")
        from vims.tables import read_table

        summary = summarize(read_table(output))
    result = {"dataset": str(source), "summary": summary, "missing": MISSING}
    if as_json:
        print_json(result)
        return
    out.print(f"ADFA-LD: {summary['traces']:,} traces: {summary['by']['split']}")
    out.print("Not built yet: " + "; ".join(MISSING))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
