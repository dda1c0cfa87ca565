"""Which programs start which: the trace table's ``parent``, a model set's lineage, and the report's
process whose start the training data rules out (a web server's PHP worker starting ``sh``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from vims.avm.agent import Agent
from vims.avm.replay import replay
from vims.datasets.capture import traces_from_events
from vims.events import example_events
from vims.models.persist import load_model, save_model
from vims.training.per_program import fit_model_set


def _with_ppid(events: pa.Table, ppid: list[int]) -> pa.Table:
    i = events.schema.get_field_index("ppid")
    return events.set_column(i, "ppid", pa.array(ppid, pa.int32()))


def test_each_trace_names_the_program_its_parent_ran_when_it_began() -> None:
    rows = [
        (10, "php-fpm", 0, None),        # a PHP worker, started by init (not in the capture)
        (11, "php-fpm", 56, None),       # its fork: still php-fpm ...
        (11, "php-fpm", 59, "/bin/sh"),  # ... then sh
        (11, "sh", 1, None),
        (20, "sh", 0, None),             # 20 runs sh (its parent is init) ...
        (20, "sh", 59, "/bin/cat"),      # ... then cat in its place: sh started cat
        (20, "cat", 0, None),
        (21, "cat", 1, None),            # started by 20 after 20 ran cat
        (30, "ls", 0, None),             # its parent made no call in the capture
    ]
    ev = _with_ppid(example_events(rows, vm_id="vm"), [1, 10, 10, 10, 1, 1, 1, 20, 99])
    t = traces_from_events(ev)
    got = [(r["trace_id"], r["program"], r["parent"]) for r in t.select(["trace_id", "program", "parent"]).to_pylist()]
    assert got == [("vims:vm:10:0", "php-fpm", None), ("vims:vm:11:1", "php-fpm", "php-fpm"),
                   ("vims:vm:11:2", "sh", "php-fpm"), ("vims:vm:20:4", "sh", None),
                   ("vims:vm:20:5", "cat", "sh"), ("vims:vm:21:7", "cat", "cat"), ("vims:vm:30:8", "ls", None)]


def _trace(program: str, parent: str | None, rng: np.random.Generator, base: int) -> dict[str, object]:
    calls = (base + rng.integers(0, 4, size=300)).astype(np.int32).tolist()
    return {"program": program, "parent": parent, "label": "normal", "syscalls": calls, "length": len(calls)}


def _training() -> pa.Table:
    """Normal life: PHP workers that start nothing, ssh logins whose shells start ls."""
    rng = np.random.default_rng(0)
    rows = ([_trace("php-fpm", "php-fpm", rng, 0) for _ in range(12)]
            + [_trace("bash", "sshd", rng, 10) for _ in range(12)]
            + [_trace("ls", "bash", rng, 20) for _ in range(12)]
            + [_trace("sh", "cron", rng, 30) for _ in range(12)])
    return pa.Table.from_pylist(rows)


def test_the_model_set_keeps_who_started_whom_and_rules_out_a_start_by_what_never_started_one(tmp_path: Path) -> None:
    model_set, card = fit_model_set(_training(), detector="stide", params=["k=3"], min_traces=5)
    assert card["lineage"]["start_nothing"] == ["ls", "php-fpm", "sh"]  # 3,600 calls each, no program started
    assert model_set.lineage["bash"] == {"calls": 3600, "children": {"ls": 12}}
    save_model(model_set, tmp_path / "m.skops", card)
    loaded = load_model(tmp_path / "m.skops")[0]  # the lineage survives the safe loader
    assert "php-fpm started no program in training (3,600" in loaded.unseen_start("php-fpm", "sh")
    assert loaded.unseen_start("bash", "cat") is None  # bash started programs: a new one is no claim
    assert loaded.unseen_start("php-fpm", "php-fpm") is None  # a fork running its parent's program
    assert loaded.unseen_start("nginx", "sh") is None  # a parent the training never saw
    # traces that do not say their parent (ADFA-LD, UNM): no lineage, no claim
    plain, card = fit_model_set(_training().drop_columns(["parent"]), detector="stide", params=["k=3"], min_traces=5)
    assert plain.lineage is None and card["lineage"] is None and plain.unseen_start("php-fpm", "sh") is None


def _events(rows: list[tuple[int, str, int, str | None]], ppid: dict[int, int]) -> pa.Table:
    """Events of ``rows``, each execve with its command line (the program's name)."""
    ev = _with_ppid(example_events(rows, vm_id="vm-1"), [ppid[r[0]] for r in rows])
    argv = [path.rsplit("/", 1)[-1] if nr == 59 and path else None for _, _, nr, path in rows]
    return ev.set_column(ev.schema.get_field_index("argv"), "argv", pa.array(argv, pa.string()))


def test_a_report_scores_the_out_of_line_start_zero_and_says_why(tmp_path: Path) -> None:
    model_set, card = fit_model_set(_training(), detector="stide", params=["k=3"], min_traces=5)
    save_model(model_set, tmp_path / "m.skops", card)
    rng = np.random.default_rng(1)
    worker = [(10, "php-fpm", int(c), None) for c in rng.integers(0, 4, size=200)]
    login = [(20, "bash", int(c), None) for c in 10 + rng.integers(0, 4, size=200)]
    ls = [(21, "ls", int(c), None) for c in 20 + rng.integers(0, 4, size=50)]
    # the login shell runs its last command in its own task: bash started programs in training
    in_place = [(20, "bash", 59, "/usr/bin/cat")] + [(20, "cat", int(c), None)
                                                     for c in 20 + rng.integers(0, 4, size=50)]
    # sh making the calls a cron job's sh makes: only its start is out of line, by the worker's fork ...
    shell = [(11, "php-fpm", 59, "/bin/sh")] + [(11, "sh", int(c), None) for c in 30 + rng.integers(0, 4, size=50)]
    # ... or by an execve in a worker's own task (its parent, init, is not in the capture)
    replaced = ([(12, "php-fpm", int(c), None) for c in rng.integers(0, 4, size=50)] + [(12, "php-fpm", 59, "/bin/sh")]
                + [(12, "sh", int(c), None) for c in 30 + rng.integers(0, 4, size=50)])
    ppid = {10: 1, 11: 10, 12: 1, 20: 5, 21: 20}
    with Agent(str(tmp_path / "m.skops"), workers=2, interval_s=1.0) as agent:
        replay(agent, _events(worker + login + ls + in_place, ppid))
        normal = agent.report()["behaviour"]
        replay(agent, _events(worker + shell, ppid))
        forked = agent.report()["behaviour"]
        for _ in range(agent.builder.horizon):  # reports until the horizon has forgotten the forked shell
            agent.report()
        replay(agent, _events(replaced, ppid))
        execed = agent.report()["behaviour"]
    assert normal["score"] > 0.5 and not any(p["unseen_start"] for p in normal["top_processes"])
    for attacked, pid in ((forked, 11), (execed, 12)):
        assert attacked["score"] == 0.0 and attacked["anomalous"] is True
        first = attacked["top_processes"][0]
        assert (first["pid"], first["name"], first["score"]) == (pid, "sh", 0.0)
        assert first["unseen_start"].startswith("php-fpm started no program in training")
        assert first["evidence"][0] == f"started out of line: {first['unseen_start']}"
    assert [p["pid"] for p in execed["top_processes"] if p["unseen_start"]] == [12]


def test_a_fork_is_started_by_what_its_parent_ran_when_it_began_not_by_what_it_runs_now(tmp_path: Path) -> None:
    """A login shell forks a subshell, then runs its last command (``ls``, which starts nothing in
    training) in its own task: the subshell was started by bash, not by ls (a report read the parent's
    latest program and called a third of an hour's intervals out of line for it); a child forked
    after the shell became ls was started by ls."""
    model_set, card = fit_model_set(_training(), detector="stide", params=["k=3"], min_traces=5)
    save_model(model_set, tmp_path / "m.skops", card)
    rng = np.random.default_rng(2)
    login = [(20, "bash", int(c), None) for c in 10 + rng.integers(0, 4, size=200)]
    subshell = [(22, "bash", int(c), None) for c in 10 + rng.integers(0, 4, size=100)]
    last = [(20, "bash", 59, "/usr/bin/ls")] + [(20, "ls", int(c), None) for c in 20 + rng.integers(0, 4, size=50)]
    later = [(22, "bash", int(c), None) for c in 10 + rng.integers(0, 4, size=100)]
    by_ls = [(23, "sh", int(c), None) for c in 30 + rng.integers(0, 4, size=50)]
    ppid = {20: 5, 22: 20, 23: 20}
    with Agent(str(tmp_path / "m.skops"), workers=1, interval_s=1.0) as agent:
        replay(agent, _events(login + subshell + last + later + by_ls, ppid))
        report = agent.report()["behaviour"]
    unseen = {p["pid"]: p["unseen_start"] for p in report["top_processes"] if p["unseen_start"]}
    assert unseen == {23: "ls started no program in training (3,600 of its calls seen); here it started sh"}, unseen
    assert report["top_processes"][0]["pid"] == 23 and report["score"] == 0.0
