"""The attack scenarios on the real Debian guest: each one's effect seen from inside the guest, its anchors
checked against the guest's own evidence (journal, process list, what the processes printed), and the
reset that leaves the guest clean. One booted guest for the module (conftest's ``debian``)."""

from __future__ import annotations

import json
import re

import pytest

from vims.collector.guest import Guest
from vims.collector.guest.attacks import SCENARIOS, GroundTruth, reset, run_scenario
from vims.collector.guest.debian import DB_PASSWORD, UPLOAD_DIR, WEAK_USER
from vims.collector.guest.recording import RunSpec, play_run, scenarios_from_attacks
from vims.errors import InputError


@pytest.fixture(scope="module")
def guest(debian: Guest) -> Guest:
    """The session's Debian guest, with nothing left by an earlier attack."""
    reset(debian)
    return debian


def _service_pids(guest: Guest) -> set[int]:
    """The main pids of the long-lived services (never anchors)."""
    text = guest.run("for u in ssh nginx php8.2-fpm cron; do systemctl show -p MainPID --value $u; done")
    return {int(p) for p in text.split() if p.isdigit() and int(p) > 0}


def _alive(guest: Guest, pid: int) -> bool:
    return guest.execute(f"kill -0 {pid}")[0] == 0


def _check_window(truth: GroundTruth, name: str) -> None:
    assert truth.scenario == name and truth.family == SCENARIOS[name].family
    assert 0 < truth.started_ns < truth.ended_ns
    assert truth.anchors and all(a["pid"] > 1 and a["why"] for a in truth.anchors)
    assert GroundTruth.from_json(truth.to_json()) == truth


def test_names_and_guest_kind_are_checked(guest: Guest) -> None:
    with pytest.raises(InputError, match="one of ssh-bruteforce"):
        run_scenario(guest, "no-such-attack")
    with pytest.raises(InputError, match="not a Debian guest"):
        run_scenario(Guest({**guest.state, "kind": "mini"}), "webshell-upload")


def test_ssh_bruteforce_finds_the_password_and_logs_in(guest: Guest) -> None:
    truth = run_scenario(guest, "ssh-bruteforce", seed=1)
    _check_window(truth, "ssh-bruteforce")
    detail = truth.detail
    assert detail["hydra_found"] == WEAK_USER[1]
    assert detail["login_uid"].endswith(f"({WEAK_USER[0]})")
    assert detail["accepted_passwords"] >= 2 and detail["failed_passwords"] >= 1  # hydra's hit and the login
    # The guest's journal: every sshd that accepted the weak user's password is an anchor.
    since = f"--since=@{truth.started_ns // 10**9 - 1}"
    lines = guest.run(f"journalctl {since} _COMM=sshd -o json --output-fields=_PID,MESSAGE -q | "
                      f"grep 'Accepted password for {WEAK_USER[0]} '")  # fmt: skip
    accepted = {int(json.loads(line)["_PID"]) for line in lines.splitlines()}
    assert accepted and accepted <= truth.pids
    assert detail["login_shell"] in truth.pids
    assert not truth.pids & _service_pids(guest)


def test_webshell_upload_runs_as_www_data_and_reads_secrets(guest: Guest) -> None:
    truth = run_scenario(guest, "webshell-upload", seed=2)
    _check_window(truth, "webshell-upload")
    detail = truth.detail
    assert guest.run(f"stat -c %U {detail['shell']}").strip() == "www-data"
    assert "uid=33(www-data)" in detail["id"]
    assert detail["db_password_found"] and DB_PASSWORD
    assert detail["passwd_users"] >= 5
    assert len(truth.anchors) == detail["webshell_commands"]
    # ps, run by the shell: the anchored sh is www-data's and its parent a php-fpm worker, not an anchor
    rows = [row.split() for row in detail["ps"].splitlines()[1:]]
    by_pid = {int(r[0]): r for r in rows}
    sh = next(pid for pid in by_pid if pid in truth.pids)
    assert by_pid[sh][2:] == ["www-data", "sh"]
    parent = int(by_pid[sh][1])
    assert by_pid[parent][3].startswith("php-fpm") and parent not in truth.pids
    assert not truth.pids & _service_pids(guest)


def test_reverse_shell_answers_the_listener(guest: Guest) -> None:
    truth = run_scenario(guest, "reverse-shell", seed=3)
    _check_window(truth, "reverse-shell")
    detail = truth.detail
    assert detail["id"].startswith("uid=33(www-data)")
    assert detail["hostname"].endswith("vims-debian")
    shell = next(a["pid"] for a in truth.anchors if a["why"].startswith("the reverse shell"))
    row = next(r.split() for r in detail["ps"].splitlines() if r.split()[:1] == [str(shell)])
    assert row[2:4] == ["www-data", "bash"] and "-i" in row
    assert not _alive(guest, shell)  # it ended with the attack
    assert not truth.pids & _service_pids(guest)


def test_privesc_persistence_leaves_root_access_and_reset_removes_it(guest: Guest) -> None:
    truth = run_scenario(guest, "privesc-persistence", seed=4)
    _check_window(truth, "privesc-persistence")
    detail = truth.detail
    user = detail["user"]
    assert "/usr/bin/find" in detail["sudo_l"] and detail["root_uid"] == 0
    assert guest.run(f"getent passwd {user}").split(":")[2] == "0"
    assert guest.run(f"visudo -cf {detail['sudoers']}", check=True)
    assert "@reboot root" in guest.run(f"cat {detail['cron']}")
    assert "root@kali" in guest.run("cat /root/.ssh/authorized_keys")
    assert detail["key_login_uid"] == 0
    finger = detail["key_fingerprint"]
    lines = guest.run(f"journalctl _COMM=sshd -o json --output-fields=_PID,MESSAGE -q | grep -F '{finger}'")
    assert {int(json.loads(line)["_PID"]) for line in lines.splitlines()} <= truth.pids
    assert not truth.pids & _service_pids(guest)

    assert reset(guest) == "reset"
    assert guest.run("awk -F: '$3 == 0 {print $1}' /etc/passwd").split() == ["root"]
    assert guest.execute(f"ls {detail['sudoers']} {detail['cron']}")[0] != 0
    assert "root@kali" not in guest.run("cat /root/.ssh/authorized_keys")
    assert guest.run(f"ls -A {UPLOAD_DIR}").strip() == ""
    assert guest.run("ls /etc/sudoers.d").split() == sorted(["README", "site-cleanup", "vims"])


def test_data_theft_sends_a_tar_gz_of_etc(guest: Guest) -> None:
    truth = run_scenario(guest, "data-theft", seed=5)
    _check_window(truth, "data-theft")
    detail = truth.detail
    assert detail["has_etc_passwd"] and detail["has_config"]
    assert detail["members"] > 100 and detail["bytes"] > 10_000
    assert not truth.pids & _service_pids(guest)


def test_hidden_payload_hides_as_a_kernel_thread_and_beacons(guest: Guest) -> None:
    truth = run_scenario(guest, "hidden-payload", seed=6)
    _check_window(truth, "hidden-payload")
    detail = truth.detail
    pid, name = detail["pid"], detail["name"]
    assert pid in truth.pids
    seen = detail["seen_as"].split(None, 4)  # pid ppid user comm args, as the guest's ps listed it
    assert int(seen[0]) == pid and seen[2] == "www-data" and seen[3] == name and seen[4].startswith(name)
    assert detail["beacons"] == detail["planned"] >= 4
    assert {int(re.findall(r"\d+", line)[-1]) for line in detail["beacon_lines"]} == {pid}
    assert not _alive(guest, pid)
    reset(guest)


def test_an_attack_inside_the_normal_workload(guest: Guest) -> None:
    seconds = 20.0
    spec = RunSpec("test", "attack", 8, seconds, scenario="webshell-upload")
    played = play_run(guest, spec, 1.0, scenarios_from_attacks(("webshell-upload",))["webshell-upload"])
    assert (played.attack_error, played.workload_error) == ("", "")
    truth, result = GroundTruth.from_json(json.dumps(played.truth)), played.workload
    _check_window(truth, "webshell-upload")
    assert played.attack_at_s is not None and 0.1 * seconds <= played.attack_at_s <= 0.5 * seconds
    assert "uid=33(www-data)" in truth.detail["id"]
    assert result.results and result.duration == seconds
    # the site and the logins keep working beside the attack (nothing listens on the gate port here, and a
    # forced logrotate may meet cron's on the state file's lock: those are the workload's own affair)
    assert not {r.action.kind for r in result.failures()} & {"http-static", "http-php", "ssh-login"}
    reset(guest)
