"""Labelling a capture's processes with attacks' ground truth, and importing recorded folders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from vims.datasets.capture import traces_from_events
from vims.datasets.recorded import read_recording, run_splits
from vims.datasets.truth import GRACE_NS, Truth, attack_marks, read_truths, truths_from
from vims.errors import InputError
from vims.events import example_events
from vims.schemas import EVENT_SCHEMA, TRACE_SCHEMA, conform
from vims.tables import read_table, write_table

S = 1_000_000_000  # a second in ns


def events(rows: list[tuple[int, int, str, int, str | None, int]], vm: str = "vm") -> pa.Table:
    """Events from ``(ts_s, pid, comm, nr, path, ppid)`` rows (tgid = pid)."""
    ev = example_events([(pid, comm, nr, path) for _, pid, comm, nr, path, _ in rows], vm_id=vm)
    ev = ev.set_column(ev.schema.get_field_index("ts_ns"), "ts_ns",
                       pa.array([int(ts * S) for ts, *_ in rows], pa.uint64()))
    ev = ev.set_column(ev.schema.get_field_index("ppid"), "ppid", pa.array([r[5] for r in rows], pa.int32()))
    return conform(ev, EVENT_SCHEMA)


def truth(anchors: list[int], start: float = 10, end: float = 20, vm: str = "vm", family: str = "webshell",
          **more: Any) -> dict[str, Any]:
    return {"scenario": f"{family}-upload", "family": family, "seed": 0, "vm": vm, "started_ns": int(start * S),
            "ended_ns": int(end * S), "anchors": [{"pid": p, "why": "test"} for p in anchors], "detail": {}, **more}


#: A web server (100) whose worker (101) runs a shell (102) that runs a grandchild (103) through a
#: parent seen only as a ppid (104, never traced itself); cron (200) and its job (201) are normal.
SERVER = [
    (1, 100, "php-fpm", 0, None, 1),
    (11, 101, "php-fpm", 56, None, 100),
    (12, 102, "php-fpm", 59, "/bin/sh", 101),
    (12.5, 102, "sh", 257, "/etc/shadow", 101),
    (13, 103, "cat", 0, None, 104),
    (13.5, 200, "cron", 56, None, 1),
    (14, 201, "cron", 59, "/bin/date", 200),
    (15, 102, "sh", 231, None, 101),
]


def test_anchor_and_every_descendant_are_the_attack_the_rest_normal() -> None:
    ev = events(SERVER)
    marks = attack_marks(ev, [Truth.from_dict(truth([101, 104]))])
    assert marks.tolist() == [-1, 0, 0, 0, 0, -1, -1, 0]
    t = traces_from_events(ev, split="train", truths=truths_from(truth([101, 104])))
    rows = {(r["trace_id"], r["program"]): (r["label"], r["split"], r["family"]) for r in t.to_pylist()}
    assert rows == {
        ("vims:vm:100:0", "php-fpm"): ("normal", "train", None),
        ("vims:vm:101:1", "php-fpm"): ("attack", "attack", "webshell"),
        ("vims:vm:102:2", "sh"): ("attack", "attack", "webshell"),
        ("vims:vm:103:4", "cat"): ("attack", "attack", "webshell"),
        ("vims:vm:200:5", "cron"): ("normal", "train", None),
        ("vims:vm:201:6", "date"): ("normal", "train", None),
    }


def test_a_parent_seen_only_as_a_ppid_ends_the_chain() -> None:
    # 104 is not an anchor and its own parent is unknown: its child 103 is not the attack's
    assert attack_marks(events(SERVER), [Truth.from_dict(truth([101]))]).tolist() == [-1, 0, 0, 0, -1, -1, -1, 0]


def test_pid_reuse_outside_the_window_is_normal() -> None:
    rows = [
        (2, 300, "backup", 0, None, 1),        # pid 300 before the attack: another program
        (2.5, 300, "backup", 231, None, 1),
        (12, 300, "sh", 59, "/bin/sh", 1),     # the attack's shell gets pid 300
        (13, 301, "nc", 0, None, 300),
        (30, 301, "ls", 59, "/bin/ls", 7),     # after the window and its grace: pid 301 reused
        (31, 302, "ls", 0, None, 300),         # a child of a reused 300, after the window
    ]
    marks = attack_marks(events(rows), [Truth.from_dict(truth([300]))])
    assert marks.tolist() == [-1, -1, 0, 0, -1, -1]
    t = traces_from_events(events(rows), truths=truths_from(truth([300])))
    assert [(r["program"], r["label"]) for r in t.to_pylist()] == [
        ("backup", "normal"), ("sh", "attack"), ("nc", "attack"), ("ls", "normal"), ("ls", "normal")]


def test_the_grace_keeps_the_last_calls_of_the_attack() -> None:
    rows = [(12, 400, "sh", 0, None, 1), (20 + GRACE_NS / S / 2, 400, "sh", 231, None, 1),
            (20 + 2 * GRACE_NS / S, 401, "sh", 0, None, 400)]
    assert attack_marks(events(rows), [Truth.from_dict(truth([400]))]).tolist() == [0, 0, -1]
    assert attack_marks(events(rows), [Truth.from_dict(truth([400]))], grace_ns=0).tolist() == [0, -1, -1]


def test_threads_of_an_anchor_and_other_vms() -> None:
    ev = events([(12, 500, "hidden", 0, None, 1), (12.5, 501, "hidden", 1, None, 1)])
    tgid = ev.schema.get_field_index("tgid")
    ev = conform(ev.set_column(tgid, "tgid", pa.array([500, 500], pa.int32())), EVENT_SCHEMA)  # a thread of 500
    other = events([(12, 500, "hidden", 0, None, 1)], vm="other-vm")
    both = pa.concat_tables([ev, conform(other.set_column(0, "seq", pa.array([2], pa.uint64())), EVENT_SCHEMA)])
    assert attack_marks(both, [Truth.from_dict(truth([500]))]).tolist() == [0, 0, -1]


def test_two_attacks_get_their_own_family() -> None:
    rows = [(12, 600, "sh", 0, None, 1), (42, 700, "tar", 0, None, 1), (43, 701, "curl", 0, None, 700)]
    truths = truths_from([truth([600]), truth([700], start=40, end=45, family="exfiltration")])
    t = traces_from_events(events(rows), truths=truths)
    assert t.column("family").to_pylist() == ["webshell", "exfiltration", "exfiltration"]


def test_a_truth_matching_no_traced_process_is_an_error() -> None:
    ev = events(SERVER)
    with pytest.raises(InputError, match=r"x.parquet: ground truth of 'webshell-upload' matches no traced "
                                         r"process: none of the .* events of its window is by pid 999"):
        traces_from_events(ev, truths=truths_from(truth([999])), where="x.parquet")
    with pytest.raises(InputError, match=r"no event in its window"):
        attack_marks(ev, [Truth.from_dict(truth([101], start=100, end=110))])
    with pytest.raises(InputError, match=r"no event of vm 'elsewhere'"):
        attack_marks(ev, [Truth.from_dict(truth([101], vm="elsewhere"))])
    with pytest.raises(InputError, match=r"matches no traced process"):
        traces_from_events(EVENT_SCHEMA.empty_table(), truths=truths_from(truth([101])))


@pytest.mark.parametrize(("change", "message"), [
    ({"anchors": [{"pid": "x"}]}, r"t.json: field 'anchors\[0\].pid' must be a positive integer, not 'x'"),
    ({"anchors": "101"}, r"t.json: field 'anchors' must be a list"),
    ({"started_ns": 1.5}, r"t.json: field 'started_ns' must be an integer, not 1.5"),
    ({"ended_ns": 1}, r"t.json: field 'ended_ns' \(1\) is before 'started_ns'"),
    ({"family": None}, r"t.json: field 'family' must be text"),
    ({"seed": True}, r"t.json: field 'seed' must be an integer"),
])
def test_malformed_truths_name_the_file_and_the_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(truth([101]) | change))
    with pytest.raises(InputError, match=message):
        read_truths([path])


def test_unreadable_truth_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match=r"bad.json:1: not JSON"):
        read_truths([tmp_path / "bad.json"])
    with pytest.raises(InputError, match=r"missing.json: cannot read the ground truth"):
        read_truths([tmp_path / "missing.json"])
    (tmp_path / "lacks.json").write_text(json.dumps([truth([1]), {"scenario": "x"}]))
    with pytest.raises(InputError, match=r"lacks.json\[1\]: ground truth lacks the field 'family'"):
        read_truths([tmp_path / "lacks.json"])


def test_a_truth_round_trips_through_its_dict() -> None:
    t = Truth.from_dict(truth([101, 104]))
    assert Truth.from_dict(t.to_dict()) == t and t.anchors == (101, 104) and t.why == ("test", "test")


def test_run_splits() -> None:
    runs = [{"run_id": f"normal-{i}", "kind": "normal"} for i in range(3)]
    assert run_splits(runs) == {"normal-0": "train", "normal-1": "train", "normal-2": "validation"}
    assert run_splits(runs[:1]) == {"normal-0": "train"}
    long = [*runs[:2], {"run_id": "normal-long", "kind": "normal", "long": True}]
    assert run_splits(long) == {"normal-0": "train", "normal-1": "train", "normal-long": "validation"}


def write_recording(root: Path, failed: bool = False) -> Path:
    """A recording folder as `vims datasets record` writes it, from made-up events."""
    runs = [("normal-0", "normal", SERVER[:1] + SERVER[5:7], []),
            ("normal-1", "normal", SERVER[5:7], []),
            ("attack-webshell", "attack", SERVER, [truth([101])])]
    manifest: dict[str, Any] = {"format": "vims-recording", "version": 1, "runs": []}
    for run_id, kind, rows, truths in runs:
        folder = root / run_id
        folder.mkdir(parents=True)
        write_table(events(rows), folder / "events.parquet")
        (folder / "truth.json").write_text(json.dumps(truths))
        status = "failed" if failed and run_id == "normal-1" else "ok"
        manifest["runs"].append({"run_id": run_id, "kind": kind, "status": status,
                                 "reason": "guest-gone: test" if status == "failed" else None})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_recording_reads_as_one_labelled_table(tmp_path: Path) -> None:
    table, read = read_recording(write_recording(tmp_path / "rec"))
    assert table.schema.equals(TRACE_SCHEMA)
    rows = [(r["trace_id"], r["split"], r["label"]) for r in table.to_pylist()]
    assert ("vims:normal-0:vm:100:0", "train", "normal") in rows
    assert ("vims:normal-1:vm:200:0", "validation", "normal") in rows
    assert ("vims:attack-webshell:vm:102:2", "attack", "attack") in rows
    assert ("vims:attack-webshell:vm:200:5", "attack", "normal") in rows  # normal life during the attack
    assert len({r[0] for r in rows}) == len(rows)
    assert read["runs"] == ["normal-0", "normal-1", "attack-webshell"] and read["skipped_runs"] == []


def test_failed_runs_are_left_out_unless_asked(tmp_path: Path) -> None:
    folder = write_recording(tmp_path / "rec", failed=True)
    table, read = read_recording(folder)
    assert read["skipped_runs"] == [{"run_id": "normal-1", "status": "failed", "reason": "guest-gone: test"}]
    assert not any(":normal-1:" in t for t in table.column("trace_id").to_pylist())
    assert read_recording(folder, include_failed=True)[0].num_rows > table.num_rows


def test_a_recording_with_a_wrong_manifest(tmp_path: Path) -> None:
    folder = write_recording(tmp_path / "rec")
    (folder / "manifest.json").write_text(json.dumps({"format": "vims-recording", "runs": [{"kind": "x"}]}))
    with pytest.raises(InputError, match=r"manifest.json: field 'runs' must be a list"):
        read_recording(folder)
    (folder / "manifest.json").write_text("[]")
    with pytest.raises(InputError, match=r"manifest.json: not a VIMS recording"):
        read_recording(folder)


def vims(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_imports_with_truth_files_and_recorded_folders(tmp_path: Path) -> None:
    write_table(events(SERVER), tmp_path / "ev.parquet")
    (tmp_path / "a.json").write_text(json.dumps(truth([101])))
    (tmp_path / "b.json").write_text(json.dumps([truth([200], start=13, end=13.6, family="cron-abuse")]))
    done = vims("datasets", "import", "vims", tmp_path / "ev.parquet", "-o", tmp_path / "t.parquet",
                "--truth", tmp_path / "a.json", "--truth", tmp_path / "b.json", "--split", "train", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["by"]["family"] == {"(none)": 2, "cron-abuse": 2, "webshell": 2}  # 201: a child of 200
    assert summary["by"]["split"] == {"attack": 4, "train": 2}
    rec = write_recording(tmp_path / "rec")
    done = vims("datasets", "import", "vims", rec, "-o", tmp_path / "r.parquet", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"] == {"attack-webshell": "attack", "normal-0": "train",
                                                 "normal-1": "validation"}
    assert read_table(tmp_path / "r.parquet", TRACE_SCHEMA).num_rows == json.loads(done.stdout)["traces"]
    done = vims("datasets", "import", "vims", rec / "attack-webshell" / "events.parquet", "-o", tmp_path / "x.parquet",
                "--truth", rec / "attack-webshell")  # a run's folder stands for its truth.json
    assert done.returncode == 0, done.stderr


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    write_table(events(SERVER), tmp_path / "ev.parquet")
    (tmp_path / "a.json").write_text(json.dumps(truth([999])))
    (tmp_path / "bad.json").write_text(json.dumps(truth([101]) | {"vm": 3}))
    for bad, message in (("a.json", "matches no traced process"), ("bad.json", "field 'vm' must be text")):
        done = vims("datasets", "import", "vims", tmp_path / "ev.parquet", "-o", tmp_path / "t.parquet",
                    "--truth", tmp_path / bad)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "t.parquet").exists()


def test_the_knobs_plan_the_runs_and_key_the_cache() -> None:
    from vims.collector.guest.recording import Knobs

    knobs = Knobs(normal_runs=2, seconds=30, hours=0.5, scenarios=("reverse-shell", "data-theft"), seed=7)
    assert [(r.run_id, r.kind, r.seed, r.seconds, r.long) for r in knobs.runs()] == [
        ("normal-0", "normal", 7, 30, False), ("normal-1", "normal", 8, 30, False),
        ("normal-long", "normal", 1007, 1800.0, True),
        ("attack-reverse-shell", "attack", 2007, 30, False), ("attack-data-theft", "attack", 2008, 30, False)]
    assert knobs.key("img") == Knobs(2, 30, 0.5, ("reverse-shell", "data-theft"), 7).key("img")
    assert len({knobs.key("img"), knobs.key("other-img"), Knobs(seed=7).key("img")}) == 3
    # The tracer is part of what a recording holds; the default's key is the one made before the knob.
    plugin = dataclasses.replace(knobs, tracer="plugin")
    assert plugin.key("img") != knobs.key("img") and knobs.key("img") == dataclasses.replace(knobs).key("img")
    with pytest.raises(InputError, match="--tracer kvm: one of gdb, plugin"):
        dataclasses.replace(knobs, tracer="kvm").check()


@pytest.mark.parametrize(("knobs", "message"), [
    ({"normal_runs": -1}, "--normal-runs -1"), ({"seconds": 1.0}, "--seconds 1: at least 5"),
    ({"hours": 0.0}, "--hours 0"), ({"rate": float("nan")}, "--rate nan"),
    ({"scenarios": ("x", "x")}, "named twice"), ({"normal_runs": 0}, "nothing to record"),
])
def test_knobs_no_recording_can_have(knobs: dict[str, Any], message: str) -> None:
    from vims.collector.guest.recording import Knobs

    with pytest.raises(InputError, match=message):
        Knobs(**knobs).check()


def test_record_cli_refuses_contradicting_options(tmp_path: Path) -> None:
    done = vims("datasets", "record", "--no-attacks", "--scenario", "reverse-shell", "-o", tmp_path / "rec")
    assert done.returncode == 2 and "contradict" in done.stderr and "Traceback" not in done.stderr
    done = vims("datasets", "record", "--no-attacks", "--seconds", "1", "-o", tmp_path / "rec")
    assert done.returncode == 2 and "--seconds 1: at least 5" in done.stderr
    assert not (tmp_path / "rec").exists()


def test_cli_a_folder_that_is_not_a_recording(tmp_path: Path) -> None:
    done = vims("datasets", "import", "vims", tmp_path, "-o", tmp_path / "t.parquet")
    assert done.returncode == 2 and "not a recording (no manifest.json)" in done.stderr


def test_the_recorders_gate_service_runs_beside_a_callers_event_loop() -> None:
    """A notebook's kernel runs an event loop of its own: the recorder's service must not need the thread's."""
    import asyncio
    import socket
    import types

    from vims.collector.guest.recording import _gate_service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guest = types.SimpleNamespace(gate_address=("127.0.0.1", port))

    async def inside_a_loop() -> tuple[bool, bytes, bool]:
        with _gate_service(guest) as up, socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello\n")
            answer = c.recv(64)
            with _gate_service(guest) as second:  # the port is taken: nothing more is started
                pass
        return up, answer, second

    assert asyncio.run(inside_a_loop()) == (True, b"data: hello\n", False)
    with socket.socket() as s:  # closed afterwards: the port is free again
        s.bind(("127.0.0.1", port))
