"""A throwaway PostgreSQL cluster in a temporary folder, for tests and benchmarks of REM-S's store.

Debian's server binaries (``/usr/lib/postgresql/<major>/bin``: ``initdb``, ``pg_ctl``) make a cluster
that listens on a unix socket in its own folder only (no TCP port), with ``trust`` authentication for
its one superuser ``vims``. ``initdb`` refuses to run as root: as root the cluster belongs to the
``postgres`` account (created by Debian's package) and its commands run through ``runuser``.
Nothing here touches the system's own cluster (``pg_lsclusters``), running or not.

>>> # with TempCluster() as cluster: Store(cluster.url())  (needs the Debian package postgresql)
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from vims.errors import MissingDependencyError

BIN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "vims"


def server_bin() -> Path:
    """The newest installed ``/usr/lib/postgresql/<major>/bin`` that has ``initdb`` and ``pg_ctl``."""
    found = sorted((p for p in BIN_ROOT.glob("*/bin") if (p / "initdb").is_file() and (p / "pg_ctl").is_file()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise MissingDependencyError(f"no PostgreSQL server binaries under {BIN_ROOT} "
                                     "(install the Debian package postgresql: scripts/system-packages.sh)")
    return found[-1]


class TempCluster:
    """A PostgreSQL cluster in a temporary folder, started on entry and removed on exit.

    Parameters
    ----------
    fsync : bool
        Whether the server syncs its WAL to disk (off: faster, for tests; on: the default, for benchmarks).
    """

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self.bin = server_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="vims-pg-"))
        self.data = self.folder / "data"
        self._as: list[str] = []
        if os.getuid() == 0:  # initdb refuses root: the cluster belongs to the postgres account
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    def start(self) -> TempCluster:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        options = f"-k {self.folder} -c listen_addresses= -c fsync={'on' if self.fsync else 'off'}"
        if not self.fsync:
            options += " -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        """The ``postgresql://`` URL of database ``dbname`` over the cluster's unix socket."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={quote(str(self.folder), safe='')}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> TempCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
