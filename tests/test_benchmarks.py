"""Every benchmark runs in its quick mode and prints its table (the numbers are not asserted).

The benchmarks are found by glob, so a new ``benchmarks/bench_*.py`` is included without editing this
file. The ones that boot a guest are marked ``guest``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


def _param(path: Path) -> object:
    """One parametrisation per benchmark, marked ``guest`` if it boots one."""
    source = path.read_text()
    marks: list[pytest.MarkDecorator] = []
    if "build_guest" in source or "Guest.start" in source:
        marks.append(pytest.mark.guest)
    return pytest.param(path, marks=marks, id=path.stem)


@pytest.mark.parametrize("bench", [_param(p) for p in BENCHMARKS])
def test_benchmark_quick_mode_prints_a_table(bench: Path) -> None:
    """``bench_*.py --quick`` exits 0 and prints a table (at least two rows of numbers)."""
    done = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if any(c.isdigit() for c in line)]
    assert len(rows) >= 2, f"no table on stdout:\n{done.stdout}"
