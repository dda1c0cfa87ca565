"""Build the Debian C-VM: a bookworm system on an ext4 disk image, as a small server would run.

``build_debian()``:

1. resolves the versions of the packages it installs (``apt-cache``); they key the cache;
2. makes a bookworm root file system with ``mmdebstrap --variant=minbase`` plus systemd, udev,
   openssh-server, nginx-light, php-fpm, cron, sudo, ifupdown with the ISC DHCP client and the
   distribution's kernel with its initramfs, logrotate, curl and netcat (the client that reaches REM-S's
   gate); then configures it (:func:`_configure`): a few users, an ssh key made for the workload (kept
   beside the image, and kept across rebuilds so a guest still running from an earlier build accepts
   it), DHCP on the virtio NIC, a host name, and the small server the workload
   (:mod:`vims.collector.guest.workload`) exercises: static and PHP pages (:data:`STATIC_PAGES`,
   :data:`PHP_PAGES`), cron jobs (:data:`CRON_JOBS`, in ``/etc/cron.d/vims-site``) and the rotation of
   their logs (``/etc/logrotate.d/vims-site``, run by a cron entry and by logrotate's own timer);
   and, on purpose, the holes the attack scenarios (:mod:`vims.collector.guest.attacks`) go through
   (:func:`_configure_holes`): a user with a weak password that sshd lets log in by password
   (:data:`WEAK_USER`; every other login is by key), an upload page that stores any file under the web
   root's ``uploads/`` where nginx runs PHP (:data:`UPLOAD_PAGE`), the site's database password in
   ``config.php`` (:data:`SECRETS_FILE`), and a sudoers entry that lets ``www-data`` run ``find`` as root
   (:data:`SUDO_HOLE`; ``find -exec`` spawns a root shell: the local privilege escalation);
3. writes it to ``disk.img`` with ``mke2fs -t ext4 -d`` (no mount) and copies out the kernel and the
   initrd the guest boots from (``-kernel``/``-initrd``, the distribution's default command line);
4. builds the kernel profile from the kernel's own files: BTF from ``vmlinuz`` and the symbols from
   the kallsyms tables inside the decompressed image (:mod:`vims.collector.kallsyms`); no boot.

Everything lands in ``cache_dir("guest", "debian-<release>")``; a rebuild with nothing changed returns
the cached image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.collector.guest.image import _apt, _locked
from vims.errors import MissingDependencyError, VimsError
from vims.paths import cache_dir

__all__ = [
    "CRON_JOBS", "DB_PASSWORD", "LOGROTATE_COMMAND", "PACKAGES", "PHP_PAGES", "SECRETS_FILE", "STATIC_PAGES",
    "SUDO_HOLE", "UPLOAD_DIR", "UPLOAD_PAGE", "WEAK_USER", "DebianImage", "build_debian", "resolve_debian",
]  # fmt: skip

#: Bump when the build changes in a way the cache key would not see.
BUILD_FORMAT = 3
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "systemd-sysv", "udev", "openssh-server", "nginx-light", "php-fpm", "cron", "sudo", "iproute2",
    "ifupdown", "isc-dhcp-client", "procps", "linux-image-amd64", "initramfs-tools", "logrotate", "curl",
    "netcat-openbsd",
)  # fmt: skip
USERS = ("alice", "bob", "carol")
WORKLOAD_USER = "vims"
DISK_SIZE = "2G"
HOSTNAME = "vims-debian"

_INTERFACES = """\
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
"""
# The virtio NIC is eth0 whatever PCI slot it sits in (the kernel's command line stays the default).
_LINK = "[Match]\nDriver=virtio_net\n\n[Link]\nName=eth0\n"
_INDEX_PHP = "<?php\nheader('Content-Type: text/plain');\necho 'vims ', gethostname(), ' ', date('c'), \"\\n\";\n"
_NGINX_SITE = """\
server {
    listen 80 default_server;
    root /var/www/html;
    index index.html index.php;
    location / { try_files $uri $uri/ =404; }
    location ~ \\.php$ {
        include snippets/fastcgi-php.conf;
        fastcgi_pass unix:/run/php/php-fpm.sock;
    }
}
"""

#: The web site's static pages: path under the document root -> content.
STATIC_PAGES = {
    "index.html": "<html><body>vims debian guest</body></html>\n",
    "about.html": "<html><head><title>About</title><link rel=stylesheet href=/css/site.css></head>"
    "<body><h1>About this server</h1><p>A small Debian server: nginx, PHP, cron, ssh.</p></body></html>\n",
    "docs/guide.html": "<html><head><title>Guide</title></head><body><h1>Guide</h1><ol><li>Log in with your key"
    "</li><li>Read the status page</li><li>Search the site</li></ol></body></html>\n",
    "css/site.css": "body { font-family: sans-serif; margin: 2em; }\nh1 { color: #234; }\n",
    "robots.txt": "User-agent: *\nDisallow: /api.php\n",
}
_STATUS_PHP = """<?php
header('Content-Type: text/plain');
$load = sys_getloadavg();
printf("status ok\\nhost %s\\nload %.2f %.2f %.2f\\nuptime %s\\n", gethostname(), $load[0], $load[1], $load[2],
       trim(file_get_contents('/proc/uptime')));
"""
_SEARCH_PHP = """<?php
$q = isset($_GET['q']) ? strtolower((string)$_GET['q']) : '';
$items = ['nginx', 'php', 'debian', 'cron', 'logrotate', 'ssh', 'systemd', 'kernel', 'backup', 'status'];
$hits = array_values(array_filter($items, fn($i) => $q !== '' && str_contains($i, $q)));
echo '<html><body><h1>Search: ', htmlspecialchars($q), '</h1><ul>';
foreach ($hits as $h) { echo '<li>', htmlspecialchars($h), '</li>'; }
echo '</ul><p>', count($hits), " results</p></body></html>\\n";
"""
_API_PHP = """<?php
header('Content-Type: application/json');
$n = isset($_GET['n']) ? max(1, min(50, (int)$_GET['n'])) : 5;
$rows = [];
for ($i = 0; $i < $n; $i++) { $rows[] = ['id' => $i, 'sha1' => sha1(gethostname() . $i)]; }
echo json_encode(['host' => gethostname(), 'time' => time(), 'rows' => $rows]), "\\n";
"""
#: The PHP pages: path -> (content, a string every good answer contains).
PHP_PAGES = {
    "index.php": (_INDEX_PHP, "vims "),
    "status.php": (_STATUS_PHP, "status ok"),
    "search.php": (_SEARCH_PHP, "results</p>"),
    "api.php": (_API_PHP, '"rows"'),
}
_LOG_DIR = "/var/log/vims-site"
#: The rotation of the site's logs, with their own state file (the cron entry; the workload adds ``--force``).
LOGROTATE_COMMAND = "/usr/sbin/logrotate --state /var/lib/logrotate/vims-site.status /etc/logrotate.d/vims-site"
_LOGROTATE = f"""{_LOG_DIR}/*.log {{
    size 4k
    rotate 4
    compress
    missingok
    notifempty
    copytruncate
}}
"""
_SCRIPTS = {
    "site-health": f"""#!/bin/sh
# Is the web site up? One line per check in the site's health log.
code=$(curl -s -o /dev/null -m 10 -w '%{{http_code}} %{{time_total}}' http://127.0.0.1/status.php) || code=down
echo "$(date -Is) status.php $code load $(cut -d' ' -f1-3 /proc/loadavg)" >> {_LOG_DIR}/health.log
""",
    "site-report": f"""#!/bin/sh
# The site's pages and their sizes, for the people who run it.
set -e
find /var/www/html -type f -printf '%s %P\\n' | sort -k2 > /var/www/cache/pages.txt.new
mv /var/www/cache/pages.txt.new /var/www/cache/pages.txt
echo "$(date -Is) pages $(wc -l < /var/www/cache/pages.txt)" >> {_LOG_DIR}/report.log
""",
    "site-backup": f"""#!/bin/sh
# A copy of the web site and the web server's configuration; the last five are kept.
set -e
dir=/var/backups/vims-site
mkdir -p "$dir"
tar -czf "$dir/site-$(date +%Y%m%d-%H%M%S)-$$.tar.gz" -C / var/www/html etc/nginx
ls -1t "$dir"/site-*.tar.gz | tail -n +6 | xargs -r rm -f
echo "$(date -Is) backup $(ls "$dir" | wc -l) kept" >> {_LOG_DIR}/backup.log
""",
}
#: The server's cron jobs: name -> (schedule, user, command), as ``/etc/cron.d/vims-site`` lists them.
CRON_JOBS = {
    "site-health": ("* * * * *", "root", "/usr/local/bin/site-health"),
    "site-report": ("* * * * *", "www-data", "/usr/local/bin/site-report"),
    "site-backup": ("*/5 * * * *", "root", "/usr/local/bin/site-backup"),
    "logrotate": ("*/5 * * * *", "root", LOGROTATE_COMMAND),
}
# -- the holes, on purpose: what the attack scenarios (vims.collector.guest.attacks) go through --------
#: The user with a weak password (a common word): sshd takes passwords from this user only.
WEAK_USER = ("dave", "sunshine")
_SSHD_CONFIG = (
    "UseDNS no\nPasswordAuthentication no\n"
    "# The one account that still logs in by password (weak: the brute-force scenario finds it).\n"
    f"Match User {WEAK_USER[0]}\n    PasswordAuthentication yes\n"
)
#: The site's database password, in the PHP configuration file every page could include.
DB_PASSWORD = "s3cr3t-Db-2024"
#: The site's configuration (under the web root, readable by the web server: what an attacker reads).
SECRETS_FILE = "/var/www/html/config.php"
_CONFIG_PHP = f"""<?php
// Site configuration (included by the pages that talk to the database).
$db_host = 'localhost';
$db_name = 'site';
$db_user = 'site';
$db_password = '{DB_PASSWORD}';
"""
#: Where the upload page stores files (served by nginx, which runs any ``.php`` there).
UPLOAD_DIR = "/var/www/html/uploads"
#: The vulnerable upload page: path under the document root -> content. It keeps the client's file name
#: and never checks the extension, so an uploaded ``.php`` file runs as the web server's user.
UPLOAD_PAGE = ("upload.php", """<?php
// Profile pictures: POST a multipart field "file"; stored under uploads/ with the name it came with.
if ($_SERVER['REQUEST_METHOD'] === 'POST' && isset($_FILES['file'])) {
    $name = basename($_FILES['file']['name']);
    if (move_uploaded_file($_FILES['file']['tmp_name'], __DIR__ . '/uploads/' . $name)) {
        echo "stored uploads/$name\n";
    } else {
        http_response_code(500);
        echo "upload failed\n";
    }
} else {
    echo '<html><body><form method="post" enctype="multipart/form-data">',
         '<input type="file" name="file"><input type="submit" value="Upload"></form></body></html>', "\n";
}
""")
#: The deliberate misconfiguration (local privilege escalation): ``www-data`` may run ``find`` as root
#: without a password "to clean old uploads", and ``find -exec /bin/sh`` is a root shell.
SUDO_HOLE = ("site-cleanup", "# The site's cleanup of old uploads (runs as the web server).\n"
             "www-data ALL=(root) NOPASSWD: /usr/bin/find\n")

_CRONTAB = (
    "# The small server's own jobs (the VIMS workload runs them on demand too).\n"
    "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    + "".join(f"{when} {user} {command}\n" for when, user, command in CRON_JOBS.values())
)


@dataclass
class DebianImage:
    """A built Debian guest: kernel, initrd, ext4 disk, kernel profile and the workload's ssh key.

    Attributes
    ----------
    release : str
        The kernel release (``6.1.0-57-amd64``).
    kernel, initramfs, disk, profile : Path
        ``vmlinuz``, the distribution's initrd, the raw ext4 root disk and the profile JSON.
    ssh_key : Path
        The private key that logs in as root and as the workload user (public key beside it).
    """

    release: str
    kernel: Path
    initramfs: Path
    disk: Path
    profile: Path
    ssh_key: Path
    directory: Path = field(default_factory=Path)
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "debian"

    @classmethod
    def at(cls, directory: Path) -> DebianImage:
        """The image whose files are in ``directory`` (a cache folder)."""
        meta = directory / "build.json"
        info = json.loads(meta.read_text()) if meta.exists() else {}
        return cls(
            release=str(info.get("release", "")),
            kernel=directory / "vmlinuz",
            initramfs=directory / "initrd.img",
            disk=directory / "disk.img",
            profile=directory / "profile.json",
            ssh_key=directory / "id_ed25519",
            directory=directory,
            info=info,
        )

    def complete(self) -> bool:
        """Whether every file of the image exists."""
        paths = (self.kernel, self.initramfs, self.disk, self.profile, self.ssh_key)
        return all(p.exists() for p in paths) and (self.directory / "build.json").exists()


def resolve_debian() -> dict[str, str]:
    """The candidate version of every package the image installs (one ``apt-cache show``)."""
    text = _apt(["apt-cache", "show", "--no-all-versions", *PACKAGES])
    versions: dict[str, str] = {}
    package = ""
    for line in text.splitlines():
        if line.startswith("Package:"):
            package = line.split(":", 1)[1].strip()
        elif line.startswith("Version:") and package:
            versions.setdefault(package, line.split(":", 1)[1].strip())
        elif line.startswith("Depends:") and package == "linux-image-amd64":
            kernel = line.split(":", 1)[1].split(",")[0].split()[0]
            versions["kernel_package"] = kernel
    missing = [p for p in PACKAGES if p not in versions]
    if missing or "kernel_package" not in versions:
        raise MissingDependencyError(f"apt knows no {', '.join(missing) or 'kernel'} (try `apt-get update`)")
    versions["release"] = versions["kernel_package"].removeprefix("linux-image-")
    return versions


def _cache_key(versions: dict[str, str]) -> str:
    recipe = [PACKAGES, USERS, MIRRORS, _INTERFACES, _LINK, _NGINX_SITE, DISK_SIZE, STATIC_PAGES, PHP_PAGES,
              _SCRIPTS, _CRONTAB, _LOGROTATE, WEAK_USER, _SSHD_CONFIG, _CONFIG_PHP, UPLOAD_DIR, UPLOAD_PAGE,
              SUDO_HOLE]  # fmt: skip
    data = {"format": BUILD_FORMAT, "versions": versions, "recipe": recipe}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _run(args: list[str], what: str, timeout: float = 1800) -> None:
    if shutil.which(args[0]) is None:
        raise MissingDependencyError(f"{args[0]} not found: run scripts/system-packages.sh")
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise VimsError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _in_root(root: Path, command: str) -> None:
    _run(["chroot", str(root), "/bin/sh", "-ec", command], f"`{command[:60]}` in the guest root")


def _configure(root: Path, public_key: str) -> None:
    """Users, keys, network, web site and host name of the guest (run as root on the host)."""
    users = " ".join((*USERS, WORKLOAD_USER))
    _in_root(
        root,
        f"for u in {users}; do useradd -m -s /bin/bash $u; done; "
        f"usermod -aG sudo {WORKLOAD_USER}; passwd -d root >/dev/null",
    )
    for home, owner in [("root", "root"), *[(f"home/{u}", u) for u in (*USERS, WORKLOAD_USER)]]:
        _write(root, f"{home}/.ssh/authorized_keys", public_key, 0o600)
        _in_root(root, f"chown -R {owner}:{owner} /{home}/.ssh && chmod 700 /{home}/.ssh")
    _write(root, f"etc/sudoers.d/{WORKLOAD_USER}", f"{WORKLOAD_USER} ALL=(ALL) NOPASSWD:ALL\n", 0o440)
    _write(root, "etc/network/interfaces", _INTERFACES)
    _write(root, "etc/systemd/network/10-vims-virtio.link", _LINK)
    _write(root, "etc/hostname", HOSTNAME + "\n")
    _write(root, "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    _write(root, "etc/fstab", "/dev/vda / ext4 errors=remount-ro 0 1\n")
    _write(root, "etc/ssh/sshd_config.d/vims.conf", _SSHD_CONFIG)
    _configure_site(root)
    _configure_holes(root)


def _configure_site(root: Path) -> None:
    """The small server: web pages, cron jobs and their scripts, the rotation of their logs."""
    _write(root, "etc/nginx/sites-available/default", _NGINX_SITE)
    for page, text in STATIC_PAGES.items():
        _write(root, f"var/www/html/{page}", text)
    for page, (text, _marker) in PHP_PAGES.items():
        _write(root, f"var/www/html/{page}", text)
    for name, script in _SCRIPTS.items():
        _write(root, f"usr/local/bin/{name}", script, 0o755)
    _write(root, "etc/cron.d/vims-site", _CRONTAB)
    _write(root, "etc/logrotate.d/vims-site", _LOGROTATE)
    _in_root(
        root,
        f"mkdir -p {_LOG_DIR} /var/www/cache && touch {_LOG_DIR}/health.log {_LOG_DIR}/backup.log "
        f"{_LOG_DIR}/report.log && chown www-data:www-data {_LOG_DIR}/report.log /var/www/cache",
    )


def _configure_holes(root: Path) -> None:
    """The weaknesses left on purpose for the attack scenarios (see the module docstring)."""
    user, password = WEAK_USER
    _in_root(root, f"useradd -m -s /bin/bash {user} && echo '{user}:{password}' | chpasswd")
    _write(root, SECRETS_FILE.lstrip("/"), _CONFIG_PHP, 0o640)
    _write(root, f"var/www/html/{UPLOAD_PAGE[0]}", UPLOAD_PAGE[1])
    _write(root, f"etc/sudoers.d/{SUDO_HOLE[0]}", SUDO_HOLE[1], 0o440)
    _in_root(root, f"mkdir -p {UPLOAD_DIR} && chown www-data:www-data {UPLOAD_DIR} && "
                   f"chown root:www-data {SECRETS_FILE}")


def build_debian(force: bool = False, log: Callable[[str], None] | None = None) -> DebianImage:
    """Build (or reuse from the cache) the Debian guest image; see the module docstring.

    Parameters
    ----------
    force : bool
        Rebuild even if the cache holds an image with the same key.
    log : callable, optional
        Receives one line per build step.
    """
    say = log or (lambda _msg: None)
    versions = resolve_debian()
    key = _cache_key(versions)
    directory = cache_dir("guest", f"debian-{versions['release']}")
    with _locked(directory / ".lock"):
        image = DebianImage.at(directory)
        if not force and image.complete() and image.info.get("key") == key:
            return image
        return _build(directory, versions, key, say)


def _build(directory: Path, versions: dict[str, str], key: str, say: Callable[[str], None]) -> DebianImage:
    started = time.monotonic()
    release = versions["release"]
    for name in ("build.json", "profile.json", "disk.img"):
        (directory / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-", dir=cache_dir("guest", "tmp")) as tmp:
        root = Path(tmp) / "root"
        say(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages, kernel {release})")
        _run(
            ["mmdebstrap", "--variant=minbase", "--mode=root", f"--include={','.join(PACKAGES)}",
             "--aptopt=Acquire::Retries \"3\"", SUITE, str(root), *MIRRORS],
            "mmdebstrap",
        )  # fmt: skip
        strap_seconds = time.monotonic() - started
        _workload_key(directory)
        say("configuring users, ssh key, network")
        _configure(root, (directory / "id_ed25519.pub").read_text())
        shutil.copyfile(root / "boot" / f"vmlinuz-{release}", directory / "vmlinuz")
        shutil.copyfile(root / "boot" / f"initrd.img-{release}", directory / "initrd.img")
        say(f"writing the ext4 disk ({DISK_SIZE})")
        mkfs_started = time.monotonic()
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vims-root", "-d", str(root),
              str(directory / "disk.img"), DISK_SIZE], "mke2fs")  # fmt: skip
        mkfs_seconds = time.monotonic() - mkfs_started
    say("building the kernel profile from the kernel's BTF and kallsyms tables")
    from vims.collector.kallsyms import build_profile

    profile = build_profile(directory / "vmlinuz", release, {"kernel_args": "default", "cpu": "max"})
    (directory / "profile.json").write_text(json.dumps(profile, separators=(",", ":")))
    disk_used = _disk_used(directory / "disk.img")
    info = {
        "release": release,
        "key": key,
        "kind": "debian",
        "versions": versions,
        "strap_seconds": round(strap_seconds, 1),
        "mkfs_seconds": round(mkfs_seconds, 1),
        "build_seconds": round(time.monotonic() - started, 1),
        "disk_bytes_used": disk_used,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (directory / "build.json").write_text(json.dumps(info, indent=2))
    say(f"Debian guest image ready in {directory} ({info['build_seconds']} s)")
    return DebianImage.at(directory)


def _workload_key(directory: Path) -> None:
    """Make the workload's ssh key, or keep the one there (guests booted from an earlier build accept it)."""
    key, public = directory / "id_ed25519", directory / "id_ed25519.pub"
    if key.exists() and public.exists():
        return
    key.unlink(missing_ok=True)
    public.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vims-workload", "-f", str(key)], "ssh-keygen")


def _disk_used(path: Path) -> int:
    """Bytes the sparse disk image really occupies."""
    return int(path.stat().st_blocks) * 512
