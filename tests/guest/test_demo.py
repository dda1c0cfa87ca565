"""The main job end to end: ``vims demo --image mini --json`` on the busybox guest (its own boot, REM-S,
the A-VM). The Debian guest's run of the same story is ``tests/guest_debian/test_demo.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_story_holds(tmp_path: Path) -> None:
    output = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "vims.cli", "demo", "--image", "mini", "--json", "-o", str(output)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["allowed_before_attack"] is True
    # the order of events (how fast is for benchmarks/): cut after the attack began, never let in again
    assert summary["cut_kind"] in ("cut", "deny") and summary["cut_after_s"] >= 0, summary
    assert summary["allowed_after_cut"] == [], summary
    assert summary["refused_after_kernel_patch"] is True, summary
    assert "kernel-text" in summary["refusal_reason"]
    # the web server, the shell it ran or what the shell started (timeout nc -l: the listener)
    assert {"sh", "httpd", "exec.cgi", "cat", "timeout", "nc"} & set(summary["blamed"]), summary["blamed"]
    for name in ("index.html", "timeline.png", "summary.json", "reports.jsonl", "decisions.json"):
        assert (output / name).stat().st_size > 0, name
    assert json.loads((output / "summary.json").read_text())["ok"] is True
