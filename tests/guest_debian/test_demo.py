"""The demo's story on the Debian guest: ``vims demo --json`` (its default image: KASLR, 2 vCPUs, network).

Its own boot, REM-S and A-VM, as a user's ``make demo`` runs it; the client reaches the gate by TCP
through QEMU's ``guestfwd``, the webshell is PHP run by the web server, the kernel patch lands where
KASLR put the function. The web shell's commands look like any shell's to the sequence models; what
cuts it is the lineage: no PHP worker of the training data ever started a program.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_story_holds_on_debian(tmp_path: Path) -> None:
    output = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "vims.cli", "demo", "--json", "-o", str(output)],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["image"] == "debian"
    assert summary["allowed_before_attack"] is True
    # the order of events (how fast is for benchmarks/): cut after the attack began, never let in again
    assert summary["cut_kind"] in ("cut", "deny") and summary["cut_after_s"] >= 0, summary
    assert "behaviour score" in summary["cut_reason"], summary
    assert summary["allowed_after_cut"] == [], summary
    assert summary["refused_after_kernel_patch"] is True, summary
    assert "kernel-text" in summary["refusal_reason"]
    assert {"sh", "php-fpm8.2"} & set(summary["blamed"]), summary["blamed"]
    assert json.loads((output / "summary.json").read_text())["ok"] is True
