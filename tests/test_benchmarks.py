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


def test_the_shared_measurements_of_the_benchmarks(tmp_path: Path) -> None:
    """``benchmarks/measure.py``: nearest-rank quantiles, and a process's CPU time read from /proc (a
    command name with spaces and parentheses too)."""
    import importlib.util
    import os
    import shutil

    # The benchmarks import it from their own folder (a script's folder is first on its path); the
    # test loads the same file by its path.
    spec = importlib.util.spec_from_file_location("measure", BENCHMARKS[0].parent / "measure.py")
    assert spec is not None and spec.loader is not None
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    cpu_seconds, pct = measure.cpu_seconds, measure.pct

    values = [float(v) for v in range(100, 0, -1)]  # 100 ... 1, unsorted
    assert (pct(values, 0.0), pct(values, 0.5), pct(values, 0.99), pct(values, 1.0)) == (1.0, 51.0, 99.0, 100.0)
    assert pct([], 0.5) is None and pct([7.0], 0.99) == 7.0
    before = os.times()
    own = cpu_seconds(os.getpid())
    after = os.times()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert before.user + before.system - tick <= own <= after.user + after.system + tick
    odd = tmp_path / "a) b (c"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        assert 0.0 <= cpu_seconds(proc.pid) < 5.0  # parsed past the odd name: utime and stime, not its text
    finally:
        proc.kill()
        proc.wait()
