"""``vims datasets record`` on the real Debian guest: a normal run and an attack run, imported with labels.

The first attack is a scenario of the test's own (an odd command tree run over ``guest.execute``,
its ground truth built from the same fields the attack scenarios give), so the recorder is tested
with the scenario as a parameter, not with one attack hard-wired; the last is a real one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vims.collector.guest import Guest
from vims.collector.guest.attacks import reset
from vims.collector.guest.recording import Knobs, RecordingError, cached, record, scenarios_from_attacks
from vims.datasets.recorded import read_recording
from vims.errors import VimsError
from vims.schemas import EVENT_SCHEMA
from vims.tables import read_table

#: The odd command tree: a shell that prints its pid, then runs od, head, wc, uname and base64.
ODD_TREE = ("sh -c 'echo ANCHOR $$; for f in /etc/hostname /etc/passwd; do od -c $f | head -n 2; done | wc -c; "
            "uname -a | base64 >/dev/null'")
ODD_PROGRAMS = {"od", "head", "wc", "uname", "base64"}


@dataclass
class OddTruth:
    """Shaped as the attack scenarios' ``GroundTruth``."""

    scenario: str
    family: str
    seed: int
    vm: str
    started_ns: int
    ended_ns: int
    anchors: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def odd_tree(guest: Guest, seed: int, log: Callable[[str], None] | None) -> OddTruth:
    started = time.time_ns()
    rc, text = guest.execute(ODD_TREE, timeout=60)
    ended = time.time_ns()
    assert rc == 0, text
    pid = int(next(line for line in text.splitlines() if line.startswith("ANCHOR")).split()[1])
    return OddTruth("odd-tree", "odd", seed, guest.name, started, ended, [{"pid": pid, "why": "the odd shell"}],
                    {"output": text[-200:]})


def broken(guest: Guest, seed: int, log: Callable[[str], None] | None) -> OddTruth:
    raise VimsError("the exploit did not land")


def test_a_normal_run_and_an_attack_run_import_with_labels(debian: Guest, tmp_path: Path) -> None:
    knobs = Knobs(normal_runs=1, seconds=20.0, scenarios=("odd-tree",))
    seen: list[str] = []
    manifest = record(debian, tmp_path / "rec", knobs, {"odd-tree": odd_tree},
                      progress=lambda spec, i, p: seen.append(spec.run_id))
    assert [(r["run_id"], r["status"]) for r in manifest["runs"]] == [("normal-0", "ok"), ("attack-odd-tree", "ok")]
    assert manifest["complete"] and cached(tmp_path / "rec", debian, knobs) == manifest
    assert set(seen) == {"normal-0", "attack-odd-tree"}
    for run in manifest["runs"]:
        folder = tmp_path / "rec" / run["run_id"]
        info = json.loads((folder / "run.json").read_text())
        assert info["events"] == read_table(folder / "events.parquet", EVENT_SCHEMA).num_rows > 100
        assert info["workload"]["actions"] > 0 and info["tracer"]["reason"] == "interrupted"
        assert info["guest"]["image_key"] and info["guest"]["release"]
    truth = json.loads((tmp_path / "rec" / "attack-odd-tree" / "truth.json").read_text())
    assert [t["scenario"] for t in truth] == ["odd-tree"] and truth[0]["vm"] == debian.name
    attack_info = json.loads((tmp_path / "rec" / "attack-odd-tree" / "run.json").read_text())
    assert 0 < attack_info["attack_at_s"] < 10 and attack_info["family"] == "odd"
    assert json.loads((tmp_path / "rec" / "normal-0" / "truth.json").read_text()) == []

    table, read = read_recording(tmp_path / "rec")
    rows = table.to_pylist()
    attack = [r for r in rows if r["label"] == "attack"]
    assert {r["program"] for r in attack} >= {"od", "base64"}
    assert {r["program"] for r in attack} <= ODD_PROGRAMS | {"sh"}
    assert all(r["family"] == "odd" and r["split"] == "attack" and ":attack-odd-tree:" in r["trace_id"]
               for r in attack)
    assert {r["split"] for r in rows if ":normal-0:" in r["trace_id"]} == {"train"}
    assert read["splits"] == {"attack-odd-tree": "attack", "normal-0": "train"}
    normal_programs = {r["program"] for r in rows if r["label"] == "normal"}
    assert {"nginx", "sshd"} & normal_programs  # the workload's life, traced beside the attack


def test_a_failed_attack_marks_its_run_and_keeps_its_events(debian: Guest, tmp_path: Path) -> None:
    knobs = Knobs(normal_runs=0, seconds=10.0, scenarios=("broken",))
    with pytest.raises(RecordingError, match=r"1 of 1 runs failed.*attack-broken: scenario broken failed: "
                                             r"the exploit did not land"):
        record(debian, tmp_path / "rec", knobs, {"broken": broken})
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["failed"] and not manifest["complete"]
    assert read_table(tmp_path / "rec" / "attack-broken" / "events.parquet", EVENT_SCHEMA).num_rows > 0
    assert cached(tmp_path / "rec", debian, knobs) is None


def test_a_real_attack_recorded_inside_the_workload_is_labelled_by_its_truth(debian: Guest, tmp_path: Path) -> None:
    """A real scenario (the reverse shell of :mod:`vims.collector.guest.attacks`) through the recorder: its
    shell's processes are the attack's traces, and the web server that served it stays normal."""
    knobs = Knobs(normal_runs=0, seconds=30.0, scenarios=("reverse-shell",))
    manifest = record(debian, tmp_path / "rec", knobs, scenarios_from_attacks(knobs.scenarios))
    assert [(r["run_id"], r["status"]) for r in manifest["runs"]] == [("attack-reverse-shell", "ok")]
    table, _read = read_recording(tmp_path / "rec")
    rows = table.to_pylist()
    attack = {r["program"] for r in rows if r["label"] == "attack"}
    # php-fpm8.2: the web shell's child between its fork and its exec of sh (the same attack process)
    assert "bash" in attack and attack <= {"bash", "sh", "setsid", "id", "hostname", "uname", "ls", "ps",
                                           "php-fpm8.2"}, attack
    assert {"nginx", "php-fpm8.2"} & {r["program"] for r in rows if r["label"] == "normal"}
    reset(debian)
