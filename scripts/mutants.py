#!/usr/bin/env python3
"""Break the code on purpose, in a scratch copy, and say which test catches each break (issue 20).

Each mutation is a textual replacement in one file. For each, the repository's working tree (without
``.git`` and ``.venv``) is copied to a temporary folder, the replacement is applied there, and the named
tests run against the copy: a ``vims`` package folder is assembled from the copy the way
``[tool.setuptools] package-dir`` of pyproject.toml maps its top-level folders into ``vims.*``, and put
first on ``PYTHONPATH`` (the editable install's finder comes after the path). Before the mutated run the
script checks that the copy is what gets imported and that the same tests pass on the unmutated copy.

Usage::

    .venv/bin/python scripts/mutants.py            # every mutation
    .venv/bin/python scripts/mutants.py -k ngram   # those whose name contains "ngram"

Prints a table: mutation, file, the first failing tests (caught) or SURVIVED. Exit status 1 when a
mutation survives or a baseline fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` by ``new`` in ``path`` (every occurrence; at least one must exist)."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # issue 20, item 1: check_report stops right after its time check
    Mutation("check_report stops after time", "remote/protocol.py",
             '"time is not unix seconds")\n',
             '"time is not unix seconds")\n    return report\n',
             ("tests/test_remote_fuzz.py",)),
    # item 2: the window threshold is ten times the largest held-out normal window (never alarms)
    Mutation("window threshold 10x max", "training/per_program.py",
             "(threshold_for(values, far) if len(values) else None)",
             "(10 * float(values.max()) if len(values) else None)",
             ("tests/test_avm_modelset.py",)),
    # item 3: Kneser-Ney with a fixed discount of 0.05 and the back-off weight cut to 0.3
    Mutation("ngram discount 0.05, back-off x0.3", "models/ngram.py",
             "self.discounts_[m] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5",
             "self.discounts_[m] = 0.05",
             ("tests/test_models_ngram_probabilities.py",)),
    # item 4: recalibrate_update never calls the detector's update
    Mutation("recalibrate_update skips update", "models/calibration.py",
             "        detector.update(flat)\n", "        pass\n",
             ("tests/test_models_recalibrate_update.py",)),
    # three more of our choice
    Mutation("behaviour.score upper bound dropped", "remote/protocol.py",
             "0.0 <= score <= 1.0", "0.0 <= score",
             ("tests/test_remote_fuzz.py", "tests/test_remote_units.py", "tests/test_remote_server.py")),
    Mutation("window scorer ignores --threshold", "avm/scoring.py",
             "        if self.threshold is not None:\n            thr = self.threshold\n", "",
             ("tests/test_avm_window_threshold.py", "tests/test_avm_pipeline.py", "tests/test_avm_modelset.py")),
    Mutation("dentry path not reversed", "collector/kernel.py",
             '"/" + "/".join(reversed(parts))', '"/" + "/".join(parts)',
             ("tests/test_libvmi_backend.py", "tests/test_memory.py")),
]
# the back-off half of item 3 goes with the discount half, in the same copy
EXTRA = {"ngram discount 0.05, back-off x0.3": [(
    "models/ngram.py",
    'table["g"] = np.append(np.where(seen, self.discounts_[m + 1] * ctypes / safe, 1.0), 1.0)',
    'table["g"] = np.append(np.where(seen, 0.3 * self.discounts_[m + 1] * ctypes / safe, 1.0), 1.0)')]}


def _copy(dest: Path) -> Path:
    """The working tree under ``dest/src`` and a ``vims`` package assembled from it under ``dest/pkg``."""
    src = dest / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.egg-info", ".hypothesis"))
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dest / "pkg"
    (pkg / "vims").mkdir(parents=True)
    for entry in (src / package_dir["vims"]).iterdir():
        (pkg / "vims" / entry.name).symlink_to(entry)
    for name, folder in package_dir.items():
        if name != "vims":
            (pkg / Path(*name.split("."))).symlink_to(src / folder)
    return src


def _env(dest: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(dest / "pkg"), str(dest / "src")])
    env.pop("CI", None)
    return env


def _pytest(dest: Path, tests: tuple[str, ...]) -> tuple[bool, list[str], str]:
    # run from dest (not from the copy, whose own vims/ folder would shadow the assembled package)
    src = dest / "src"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "--maxfail=3", "-p", "no:cacheprovider",
                           "--rootdir", str(src), "-c", str(src / "pyproject.toml"),
                           *(str(src / t) for t in tests)],
                          cwd=dest, env=_env(dest), capture_output=True, text=True, timeout=1800)
    failed = [f.removeprefix("src/") for f in re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)]
    return proc.returncode == 0, failed, proc.stdout[-2000:]


def _imports_copy(dest: Path, module: str) -> bool:
    proc = subprocess.run([sys.executable, "-c", f"import {module} as m; print(m.__file__)"], cwd=dest,
                          env=_env(dest), capture_output=True, text=True)
    return proc.stdout.strip().startswith(str(dest))


def run(m: Mutation) -> tuple[str, str]:
    """``(status, detail)`` of one mutation."""
    with tempfile.TemporaryDirectory(prefix="vims-mutant-") as tmp:
        dest = Path(tmp)
        src = _copy(dest)
        module = "vims." + m.path.removesuffix(".py").replace("/", ".")
        if not _imports_copy(dest, module):
            return "ERROR", f"{module} is not imported from the copy"
        ok, failed, out = _pytest(dest, m.tests)
        if not ok:
            return "ERROR", f"baseline fails: {', '.join(failed) or out[-300:]}"
        for path, old, new in [(m.path, m.old, m.new), *EXTRA.get(m.name, [])]:
            target = src / path
            text = target.read_text()
            if old not in text:
                return "ERROR", f"{old[:40]!r} not found in {path}"
            target.write_text(text.replace(old, new))
        ok, failed, out = _pytest(dest, m.tests)
        if ok:
            return "SURVIVED", "every named test passed"
        return "caught", ", ".join(failed) if failed else out[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    args = parser.parse_args()
    bad = 0
    rows = []
    for m in MUTATIONS:
        if args.k not in m.name:
            continue
        status, detail = run(m)
        bad += status != "caught"
        rows.append((m.name, m.path, status, detail))
        print(f"{m.name:38} {m.path:24} {status:9} {detail}", flush=True)
    print(f"\n{len(rows) - bad} of {len(rows)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
