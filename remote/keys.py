"""Key material of REM-S and of the A-VMs: CURVE keypairs (ZeroMQ) and Ed25519 signing keys.

Every key file is JSON written with owner-only permissions (0600) in a folder made owner-only (0700),
created that way (never chmod-ed after the fact, so a secret is never readable by others, even briefly).

- REM-S: ``rems.secret.json`` (its CURVE secret and public key) and ``rems.public.json`` (the public
  key the A-VMs need).
- An A-VM: ``avm.secret.json`` (id, CURVE secret/public key, Ed25519 seed) and ``avm.public.json``
  (id, CURVE public key, Ed25519 public key): the file REM-S enrols.

CURVE keys are Z85 text (40 characters, ZeroMQ's form); Ed25519 keys are hex.

>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> d = Path(tmp.name)
>>> avm = AvmIdentity.generate("avm-1")
>>> public = avm.write(d)
>>> oct(public.stat().st_mode & 0o777), oct((d / SECRET_AVM).stat().st_mode & 0o777)
('0o600', '0o600')
>>> AvmIdentity.load(d / SECRET_AVM).sign_public == avm.sign_public
True
>>> tmp.cleanup()
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vims.errors import InputError, VimsError

SECRET_REMS = "rems.secret.json"
PUBLIC_REMS = "rems.public.json"
SECRET_AVM = "avm.secret.json"
PUBLIC_AVM = "avm.public.json"

_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


#: Help text of the options that name an A-VM's key folder.
AVM_DIR_HELP = "Where to write the keys; default $VIMS_AVM_HOME or ~/.cache/vims/avm."


def avm_home(folder: Path | None) -> Path:
    """The A-VM's key folder: ``folder``, else ``$VIMS_AVM_HOME``, else ``~/.cache/vims/avm``."""
    from vims.paths import home_dir

    return home_dir(folder, "VIMS_AVM_HOME", "avm")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid A-VM or VM id (letters, digits, ``._-``; 1-64 characters).

    >>> check_id("vm-1")
    'vm-1'
    >>> check_id("a b")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: not a valid id: 'a b' (letters, digits, '._-', at most 64)
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InputError(f"not a valid {what}: {value!r} (letters, digits, '._-', at most 64)")
    return value


def check_z85(value: Any, where: str = "key") -> str:
    """Return ``value`` if it is a Z85 CURVE key (40 characters)."""
    if not isinstance(value, str) or not _Z85.fullmatch(value):
        raise InputError("not a Z85 CURVE key (40 characters)", where=where)
    return value


def check_hex32(value: Any, where: str = "key") -> str:
    """Return ``value`` if it is 32 bytes as 64 lower-case hex digits."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InputError("not a 32-byte hex key (64 hex digits)", where=where)
    return value


def write_private(path: Path, obj: dict[str, Any], force: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path``, created 0600 (and its folder 0700); refuse to overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise VimsError(f"{path} exists; pass --force to replace it") from None
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """Read a key file; a missing or broken one is a user error naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VimsError(f"{path}: no such key file (create it with `vims remote init` or "
                        "`vims avm init`)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"not a key file: {exc}", where=path) from exc
    if not isinstance(obj, dict):
        raise InputError("not a key file: expected a JSON object", where=path)
    return obj


def _field(obj: dict[str, Any], name: str, path: str | Path) -> Any:
    if name not in obj:
        raise InputError(f"missing field {name!r}", where=path)
    return obj[name]


@dataclass(frozen=True)
class ServerKeys:
    """REM-S's CURVE keypair (Z85 text)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> ServerKeys:
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())

    def write(self, folder: Path, force: bool = False) -> Path:
        """Write both files into ``folder``; return the public one."""
        write_private(folder / SECRET_REMS, {"kind": "vims-rems-secret", "curve_public": self.public,
                                             "curve_secret": self.secret}, force)
        return write_private(folder / PUBLIC_REMS, {"kind": "vims-rems-public", "curve_public": self.public},
                             force)

    @classmethod
    def load(cls, path: Path) -> ServerKeys:
        obj = read_json(path)
        secret = check_z85(_field(obj, "curve_secret", path), f"{path}: curve_secret")
        public = zmq.curve_public(secret.encode()).decode()
        return cls(public, secret)


def collector_keys(path: Path) -> tuple[ServerKeys, Path, bool]:
    """A collector's CURVE keypair from ``path``; made when absent.

    Returns the keys, the public file (``<stem>.public.json`` beside ``path``: what the A-VM's
    ``--collector-key`` takes) and whether they were made now. A made secret file is 0600.
    """
    public_file = path.with_name(path.name.removesuffix(".json").removesuffix(".secret") + ".public.json")
    if path.exists():
        return ServerKeys.load(path), public_file, False
    keys = ServerKeys.generate()
    write_private(path, {"kind": "vims-collector-secret", "curve_public": keys.public, "curve_secret": keys.secret})
    write_private(public_file, {"kind": "vims-collector-public", "curve_public": keys.public}, force=True)
    return keys, public_file, True


def load_server_public(path: Path) -> str:
    """REM-S's CURVE public key from ``rems.public.json`` (or the secret file)."""
    obj = read_json(path)
    return check_z85(_field(obj, "curve_public", path), f"{path}: curve_public")


@dataclass(frozen=True)
class AvmPublic:
    """What REM-S enrols: an A-VM's id and public keys."""

    avm_id: str
    curve_public: str
    sign_public: str

    @classmethod
    def load(cls, path: Path) -> AvmPublic:
        return cls.parse(read_json(path), path)

    @classmethod
    def parse(cls, obj: dict[str, Any], where: str | Path) -> AvmPublic:
        """The keys in ``obj`` (``avm_id``, ``curve_public``, ``sign_public``), checked; a user error
        names ``where`` (a file, or ``file:line``)."""
        avm_id = _field(obj, "avm_id", where)
        try:
            check_id(avm_id, "A-VM id")
        except InputError as exc:
            raise InputError(exc.message, where=where) from None
        return cls(avm_id, check_z85(_field(obj, "curve_public", where), f"{where}: curve_public"),
                   check_hex32(_field(obj, "sign_public", where), f"{where}: sign_public"))


@dataclass(frozen=True)
class AvmIdentity:
    """An A-VM's identity: its id, CURVE keypair and Ed25519 signing key."""

    avm_id: str
    curve_public: str
    curve_secret: str
    sign_seed: str  # the 32-byte Ed25519 private key, hex

    @classmethod
    def generate(cls, avm_id: str) -> AvmIdentity:
        check_id(avm_id, "A-VM id")
        public, secret = zmq.curve_keypair()
        seed = Ed25519PrivateKey.generate().private_bytes_raw().hex()
        return cls(avm_id, public.decode(), secret.decode(), seed)

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.sign_seed))

    @property
    def sign_public(self) -> str:
        return self.signing_key.public_key().public_bytes_raw().hex()

    @property
    def public(self) -> AvmPublic:
        return AvmPublic(self.avm_id, self.curve_public, self.sign_public)

    def write(self, folder: Path, force: bool = False) -> Path:
        """Write both files into ``folder``; return the public one (the file to enrol)."""
        write_private(folder / SECRET_AVM, {"kind": "vims-avm-secret", "avm_id": self.avm_id,
                                            "curve_public": self.curve_public,
                                            "curve_secret": self.curve_secret,
                                            "sign_seed": self.sign_seed}, force)
        pub = self.public
        return write_private(folder / PUBLIC_AVM, {"kind": "vims-avm-public", "avm_id": pub.avm_id,
                                                   "curve_public": pub.curve_public,
                                                   "sign_public": pub.sign_public}, force)

    @classmethod
    def load(cls, path: Path) -> AvmIdentity:
        obj = read_json(path)
        avm_id = _field(obj, "avm_id", path)
        check_id(avm_id, "A-VM id")
        secret = check_z85(_field(obj, "curve_secret", path), f"{path}: curve_secret")
        seed = check_hex32(_field(obj, "sign_seed", path), f"{path}: sign_seed")
        return cls(avm_id, zmq.curve_public(secret.encode()).decode(), secret, seed)


def verify_key(sign_public: str) -> Ed25519PublicKey:
    """The Ed25519 public key from its hex form."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(sign_public))
