"""The A-VM pipeline over real ZeroMQ sockets and real scorer processes.

- replaying a capture gives the scores batch scoring gives;
- a scorer killed with SIGKILL is restarted, and the batches it lost show in the report;
- an overloaded pipeline drops and counts instead of blocking, and its queues stay bounded.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pytest

from vims.avm.agent import Agent
from vims.avm.pipeline import Pipeline
from vims.avm.replay import replay, score_table, traces_to_events
from vims.avm.scoring import WindowScorer
from vims.events import example_events
from vims.models.ngram import NGram
from vims.models.stide import Stide
from vims.remote.protocol import check_report


def _markov_traces(n: int, length: int, seed: int, n_calls: int = 25, noise: float = 0.0) -> list[list[int]]:
    """Traces from a fixed sparse Markov chain (normal), with a share ``noise`` of random calls (odd)."""
    rng = np.random.default_rng(seed)
    nxt = np.random.default_rng(99).integers(0, n_calls, size=(n_calls, 3))
    out = []
    for _ in range(n):
        c, trace = int(rng.integers(n_calls)), []
        for _ in range(length):
            # odd calls from 100 up: never execve/exit, which start and end processes in a live stream
            c = 100 + int(rng.integers(40)) if rng.random() < noise else int(nxt[c % n_calls, rng.integers(3)])
            trace.append(c)
        out.append(trace)
    return out


@pytest.fixture(scope="module")
def normal() -> list[list[int]]:
    return _markov_traces(60, 400, seed=1)


def _wait(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _accounted(counts: dict) -> bool:
    return counts["seen"] == counts["scored"] + counts["dropped"] + counts["missing"]


@pytest.mark.parametrize("make", [lambda: Stide(k=4, aggregate="window", window=10),
                                  lambda: NGram(order=3)], ids=["stide-window", "ngram-mean"])
def test_replay_gives_batch_scores(normal, make) -> None:
    det = make().fit(normal[:40])
    test = normal[40:] + _markov_traces(8, 300, seed=7, noise=0.3)
    traces = pa.table({"trace_id": [f"t{i}" for i in range(len(test))], "program": ["prog"] * len(test),
                       "syscalls": pa.array(test, pa.list_(pa.int32()))})
    events = traces_to_events(traces)
    # deal the processes' calls out in small chunks so that every process spans many batches and workers
    calls = {1000 + i: t for i, t in enumerate(test)}
    interleaved = example_events(calls, comm="prog", interleave=7)
    assert interleaved.num_rows == events.num_rows
    with Agent(det, workers=2, interval_s=0.2) as agent:
        run = replay(agent, interleaved, batch_size=997)
        assert run["drained"]
        report = agent.report()
        got = score_table(agent, traces)
    expected = det.anomaly_score(test)
    assert got.column("trace_id").to_pylist() == traces.column("trace_id").to_pylist()
    np.testing.assert_allclose(got.column("score").to_numpy(), expected, rtol=1e-9, atol=1e-12)
    assert got.column("anomalous").to_pylist() == (expected > -det.offset_).tolist()
    # the scorer in this process, on the whole capture at once, agrees too
    ss = WindowScorer(det)
    ss.score(interleaved)
    ref = {pid: s for (_, pid, _), s in ss.trace_scores().items()}
    np.testing.assert_allclose(got.column("score").to_numpy(), [ref[1000 + i] for i in range(len(test))],
                               rtol=1e-9, atol=1e-12)
    check_report(report)
    ev = report["events"]
    assert ev["seen"] == ev["scored"] == events.num_rows and ev["dropped"] == ev["missing"] == 0
    assert report["collector"]["pipeline"]["restarts"] == 0


def test_killed_scorer_is_restarted_and_its_gap_reported(normal) -> None:
    det = Stide(k=4).fit(normal)
    rng = np.random.default_rng(3)
    reports: list[dict] = []
    with Agent(det, workers=2, interval_s=0.2, queue_size=4, hwm=2) as agent:
        agent.sinks.append(reports.append)
        victim = agent.pipeline.worker_pids()[0]
        seq = 0

        def burst(n_batches: int, rows: int = 20000) -> None:
            nonlocal seq
            for _ in range(n_batches):
                calls = {int(p): list(rng.integers(0, 25, rows // 20)) for p in range(2, 42)}  # both slots
                ev = example_events(calls, start_seq=seq, ts_ns=time.time_ns())
                seq += ev.num_rows
                agent.send(ev)

        burst(12)  # fills the worker links and queues
        os.kill(victim, signal.SIGKILL)
        burst(12)
        assert _wait(lambda: agent.pipeline.counts()["restarts"] >= 1 and all(
            w["alive"] for w in agent.pipeline.counts()["workers"]))
        assert agent.pipeline.wait_ready(60)
        new_pid = agent.pipeline.worker_pids()[0]
        assert new_pid != victim
        scored_before = agent.pipeline.counts()["workers"][0]["scored"]
        burst(4)
        agent.pipeline.drain(30)
        report = agent.report()  # the agent kept running and still reports
    check_report(report)
    slot0 = report["collector"]["pipeline"]["workers"][0]
    assert slot0["restarts"] >= 1 and slot0["exits"][0]["exitcode"] == -signal.SIGKILL
    assert slot0["exits"][0]["pid"] == victim
    assert slot0["scored"] > scored_before  # the new worker scores
    ev = report["events"]
    # the batches that died with the worker are reported, and every event is accounted for
    assert ev["missing"] + ev["dropped"] > 0
    assert slot0["missing"] + slot0["dropped"] > 0
    assert ev["seen"] == ev["scored"] + ev["dropped"] + ev["missing"]
    assert report["collector"]["pipeline"]["workers"][1]["restarts"] == 0


def test_overload_drops_and_counts_instead_of_blocking(normal) -> None:
    det = NGram(order=4).fit(normal)
    queue_size = 2
    rng = np.random.default_rng(5)
    calls = {int(p): list(rng.integers(0, 25, 2500)) for p in range(2, 22)}
    batch = example_events(calls)  # 50,000 events
    with Agent(det, workers=1, interval_s=0.5, queue_size=queue_size, hwm=1) as agent:
        results = []
        most_queued = 0
        for i in range(150):  # far more than one scorer can take while we send
            results.append(agent.send(batch.set_column(0, "seq", pa.array(
                np.arange(i * batch.num_rows, (i + 1) * batch.num_rows, dtype=np.uint64)))))
            most_queued = max(most_queued, agent.pipeline.slots[0].sender.pending)
        agent.pipeline.drain(60)
        report = agent.report()
    check_report(report)
    ev = report["events"]
    assert not all(results)  # some sends could not be queued ...
    assert ev["dropped"] == results.count(False) * batch.num_rows  # ... and every one of them is counted
    assert ev["dropped"] > 0 and ev["missing"] == 0
    assert ev["seen"] == 150 * batch.num_rows == ev["scored"] + ev["dropped"]
    assert most_queued <= queue_size  # memory stays bounded
    assert report["collector"]["pipeline"]["workers"][0]["dropped"] == ev["dropped"]


def test_collector_sequence_gaps_count_as_missing(normal) -> None:
    det = Stide(k=3).fit(normal)
    ev = example_events({5: normal[0][:100]})
    holes = ev.filter(pa.array([(i % 10) != 3 for i in range(100)]))  # every 10th event never arrived
    with Agent(det, workers=1) as agent:
        agent.send(holes, wait=10)
        agent.pipeline.drain(30)
        report = agent.report()
    assert report["events"]["missing"] == 10
    assert report["events"]["seen"] == 90 == report["events"]["scored"]


def test_two_vms_with_the_same_pid_do_not_mix(normal) -> None:
    det = NGram(order=3).fit(normal[:40])
    a, b = normal[40][:300], _markov_traces(1, 300, seed=12, noise=0.5)[0]
    events = example_events({("vm-a", 7): a, ("vm-b", 7): b}, interleave=5)
    results: list[pa.Table] = []
    with Pipeline(det, workers=2, on_result=lambda t, _meta: results.append(t)) as pipe:
        for lo in range(0, events.num_rows, 64):
            pipe.send(events.slice(lo, 64), wait=10)
        assert pipe.drain(30)
    rows = pa.concat_tables(results).to_pylist()
    last = {(r["vm_id"], r["pid"]): r for r in rows}
    assert set(last) == {("vm-a", 7), ("vm-b", 7)}
    assert last[("vm-a", 7)]["total_calls"] == len(a) and last[("vm-b", 7)]["total_calls"] == len(b)
    want = det.anomaly_score([a, b])
    assert last[("vm-a", 7)]["score"] == pytest.approx(want[0], rel=1e-9)
    assert last[("vm-b", 7)]["score"] == pytest.approx(want[1], rel=1e-9)
    assert want[0] != pytest.approx(want[1])  # mixed up, they would not give these
    # the scorer alone keys them apart too
    ws = WindowScorer(det)
    ws.score(events)
    assert ws.trace_scores() == {("vm-a", 7, "prog"): pytest.approx(want[0], rel=1e-9),
                                 ("vm-b", 7, "prog"): pytest.approx(want[1], rel=1e-9)}


def test_window_scorer_cuts_programs_and_names_evidence(normal) -> None:
    det = Stide(k=3).fit(normal)
    ws = WindowScorer(det, window=5)
    ev = example_events({7: [*normal[0][:50], 59, 257, 0, 3, 60], 8: normal[1][:30]}, comm="exe")
    paths = [None] * 50 + ["/proc/self/exe", "/etc/shadow"] + [None] * 33
    argv = [None] * 50 + ["sh -c cat /etc/shadow"] + [None] * 34
    ev = ev.set_column(ev.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
    ev = ev.set_column(ev.schema.get_field_index("argv"), "argv", pa.array(argv, pa.string()))
    ev = ev.set_column(ev.schema.get_field_index("ppid"), "ppid", pa.array([1] * 85, pa.int32()))
    rows = ws.score(ev).to_pylist()
    # pid 7 ran one program before the execve and `sh` (busybox's /proc/self/exe, named by argv[0]) after it
    assert [(r["pid"], r["name"], r["calls"]) for r in rows] == [(7, "exe", 50), (7, "sh", 5), (8, "exe", 30)]
    sh = rows[1]
    assert sh["cmdline"] == "sh -c cat /etc/shadow" and sh["ppid"] == 1
    assert sh["windows_above"] > 0 and sh["max_window"] > sh["threshold"]
    text = "\n".join(sh["evidence"])
    assert "*execve sh -c cat /etc/shadow" in text and "openat /etc/shadow" in text and "exit" in text
    # the next call of pid 7 after exit is a new process
    more = ws.score(example_events({7: normal[2][:10]}, comm="cat", start_seq=85)).to_pylist()
    assert [(r["name"], r["total_calls"]) for r in more] == [("cat", 10)]


def test_report_document(normal) -> None:
    from vims.avm.report import ReportBuilder, summary_line

    det = Stide(k=3).fit(normal)
    b = ReportBuilder("vm-9", "avm-9", interval_s=2.0, threshold=0.5, min_windows=10, horizon=2)
    ws = WindowScorer(det)
    odd = _markov_traces(1, 200, seed=11, noise=0.9)[0]
    b.add(ws.score(example_events({10: normal[1][:300], 11: odd}, comm="httpd")))
    b.set_checks([{"check": "kernel-text", "target": "_text", "status": "pass", "detail": None,
                   "cost": "deep", "ts_ns": 1}])
    counts = {"seen": 500, "scored": 500, "dropped": 0, "missing": 0, "workers": [], "restarts": 0}
    r = b.report(counts, {"state": "running", "dropped": 3}, {"p50": 0.001, "p99": 0.002})
    check_report(r)
    json.dumps(r, allow_nan=False)
    beh = r["behaviour"]
    assert beh["anomalous"] and beh["score"] < 0.5
    assert [p["pid"] for p in beh["top_processes"]] == [11]
    assert beh["top_processes"][0]["evidence"][0].startswith(f"{beh['top_processes'][0]['windows_above']} of 200")
    assert r["events"]["dropped"] == 3 and r["checks"][0]["status"] == "pass"
    assert "ANOMALOUS" in summary_line(r)
    # the score looks back `horizon` intervals: a quiet interval does not forget the anomaly at once ...
    r2 = b.report(counts, {})
    assert r2["seq"] == 2 and r2["behaviour"]["score"] == beh["score"] and r2["events"]["interval"]["seen"] == 0
    assert r2["behaviour"]["horizon_s"] == 4.0
    # ... but two quiet intervals later the VM is judged on what it does now
    r3 = b.report(counts, {})
    assert r3["behaviour"]["score"] is None and r3["behaviour"]["anomalous"] is None  # no data is not normal
    assert r3["behaviour"]["windows"] == 0 and r3["behaviour"]["top_processes"] == []


def test_report_keeps_the_parent_that_started_a_process_after_it_is_handed_to_init(normal) -> None:
    from vims.avm.report import ReportBuilder

    det = Stide(k=3).fit(normal)
    b = ReportBuilder("vm-9", "avm-9", interval_s=2.0, threshold=0.5, min_windows=10, top=5)
    ws = WindowScorer(det)
    odd = _markov_traces(2, 200, seed=12, noise=0.9)

    def scored(calls: dict[int, list[int]], comm: str, ppid: int, start_seq: int, name: str = "") -> pa.Table:
        result = ws.score(example_events(calls, comm=comm, start_seq=start_seq))
        result = result.set_column(result.schema.get_field_index("ppid"), "ppid",
                                   pa.array([ppid] * result.num_rows, pa.int32()))
        if name:  # what the scorer names a program the pid exec'd
            result = result.set_column(result.schema.get_field_index("name"), "name",
                                       pa.array([name] * result.num_rows, pa.string()))
        return result

    b.add(scored({40: normal[0][:300]}, "httpd", 1, 0))
    b.add(scored({41: odd[0][:100]}, "sh", 40, 1000))  # the shell the web server started ...
    b.add(scored({41: odd[0][100:]}, "sh", 1, 2000))  # ... after the web server is gone (init adopts it)
    b.add(scored({42: odd[1]}, "nc", 1, 3000))  # first seen when its parent had already ended
    top = {p["pid"]: p for p in b.behaviour()["top_processes"]}
    assert top[41]["ppid"] == 40 and top[41]["lineage"] == ["httpd[40]", "?[1]"], top[41]
    assert any(e == "started by httpd[40] <- ?[1]" for e in top[41]["evidence"]), top[41]["evidence"]
    assert top[42]["ppid"] == 1 and top[42]["lineage"] == ["?[1]"]
    # the same pid running another program afterwards is another process: its parent is its own
    b.add(scored({41: odd[1]}, "sh", 1, 4000, name="cat"))
    again = {(p["pid"], p["name"]): p for p in b.behaviour()["top_processes"]}
    assert again[(41, "cat")]["ppid"] == 1 and again[(41, "sh")]["ppid"] == 40


def test_replay_command(tmp_path, normal) -> None:
    from typer.testing import CliRunner

    from vims.cli import app
    from vims.models.persist import save_model
    from vims.tables import write_table

    det = Stide(k=4).fit(normal[:40])
    save_model(det, tmp_path / "m.skops")
    test = normal[40:50]
    traces = pa.table({"trace_id": [f"t{i}" for i in range(10)], "source": ["vims"] * 10, "program": ["p"] * 10,
                       "split": ["validation"] * 10, "label": ["normal"] * 10, "family": pa.nulls(10, pa.string()),
                       "syscalls": pa.array(test, pa.list_(pa.int32())),
                       "length": pa.array([len(t) for t in test], pa.int32())})
    write_table(traces, tmp_path / "t.parquet")
    result = CliRunner().invoke(app, ["avm", "replay", str(tmp_path / "t.parquet"), "-m", str(tmp_path / "m.skops"),
                                      "--workers", "1", "--json", "-o", str(tmp_path / "s.parquet")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[-1]["summary"]["events"] == sum(len(t) for t in test)
    assert any("behaviour" in line for line in lines)
    from vims.tables import read_table

    np.testing.assert_allclose(read_table(tmp_path / "s.parquet").column("score").to_numpy(),
                               det.anomaly_score(test))
    bad = CliRunner().invoke(app, ["avm", "replay", str(tmp_path / "m.skops"), "-m", str(tmp_path / "m.skops")])
    from vims.errors import InputError

    assert isinstance(bad.exception, InputError) and "m.skops" in str(bad.exception)  # `vims` exits 2 on it


@pytest.mark.parametrize("pace", [False, True], ids=["full-speed", "paced"])
def test_replay_cuts_reports_by_recorded_time(tmp_path, normal, pace) -> None:
    """10 s of recorded events, interval 2 s: five reports, each with the events of its 2 s."""
    from typer.testing import CliRunner

    from vims.cli import app
    from vims.models.persist import save_model
    from vims.tables import write_table

    save_model(Stide(k=4).fit(normal[:40]), tmp_path / "m.skops")
    events = example_events({100 + i: t[:250] for i, t in enumerate(normal[40:44])}, interleave=50)
    n = events.num_rows  # 1,000 events, recorded evenly over 10 s (a batch of 4,096 would hold them all)
    ts = np.uint64(5 * 10**9) + (np.arange(n, dtype=np.uint64) * np.uint64(10**10 // n))
    events = events.set_column(events.schema.get_field_index("ts_ns"), "ts_ns", pa.array(ts))
    write_table(events, tmp_path / "e.parquet")
    args = ["avm", "replay", str(tmp_path / "e.parquet"), "-m", str(tmp_path / "m.skops"), "--workers", "1",
            "--interval", "2", "--json"] + (["--pace", "--speed", "5"] if pace else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    reports = [line for line in lines if "behaviour" in line]
    expected = np.bincount((ts - ts[0]).astype(np.int64) // (2 * 10**9)).tolist()
    assert expected == [n // 5] * 5
    assert [r["events"]["interval"]["seen"] for r in reports] == expected
    assert [r["events"]["interval"]["scored"] for r in reports] == expected
    assert lines[-1]["summary"]["reports"] == 4  # the fifth is the final report, after the replay
