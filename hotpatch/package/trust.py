"""The trust store: which Ed25519 keys may sign the packages applied to processes.

Two locations, read together:

    system   /etc/hotpatch/trusted-keys/            %ProgramData%\\hotpatch\\trusted-keys\\
    user     $XDG_CONFIG_HOME/hotpatch/trusted-keys/ %APPDATA%\\hotpatch\\trusted-keys\\
             (~/.config when XDG_CONFIG_HOME is unset)

``$HOTPATCH_TRUST_DIR`` replaces both with one directory (tests, CI, a demo).
Each key is one file ``<key id>.pub``: the 64 hex digits of the raw public
key on its first line, then optionally ``# name``. A key id is the first 16
hex digits of the key's SHA-256 fingerprint. A store directory must not be
writable by other users (a key planted there would be trusted); the user's
is created 0700.

The policy (``check_trust``), the one used by ``hotpatch apply`` and the engine:
a package whose signature does not verify is corrupt; a validly signed package
goes in only if its signer is trusted; an unsigned one only with
``allow_unsigned``, which never admits a package signed by an unknown key.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    PackageKeyError,
    PackageSignatureError,
    PackageUnsignedError,
    PackageUntrustedError,
)
from ..securefs import UnsafePathError, check_private_dir, ensure_private_dir, write_atomic
from .format import package_id_of, signature_state_of
from .model import Package
from .signing import load_public_key

__all__ = [
    "ENV_TRUST_DIR",
    "TrustStore",
    "TrustedKey",
    "check_trust",
    "signer_json",
    "fingerprint",
    "key_id",
    "system_trust_dir",
    "user_trust_dir",
]

ENV_TRUST_DIR = "HOTPATCH_TRUST_DIR"
_MAX_KEY_FILE = 4096
_MAX_KEYS = 1024


def fingerprint(key: bytes) -> str:
    """SHA-256 of the raw 32-byte public key, 64 hex digits."""
    return hashlib.sha256(key).hexdigest()


def key_id(key: bytes) -> str:
    """The short name of a key: the first 16 hex digits of its fingerprint."""
    return fingerprint(key)[:16]


def system_trust_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "hotpatch" / "trusted-keys"
    return Path("/etc/hotpatch/trusted-keys")


def user_trust_dir() -> Path:
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "hotpatch" / "trusted-keys"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "hotpatch" / "trusted-keys"


@dataclass(frozen=True)
class TrustedKey:
    """One trusted public key and where it came from (system, user, env, or --trust for one call)."""

    key: bytes
    scope: str
    name: str = ""
    path: Path | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def to_json(self) -> dict[str, str | None]:
        return {"key_id": self.key_id, "fingerprint": self.fingerprint, "public_key": self.key.hex(),
                "scope": self.scope, "name": self.name, "path": str(self.path) if self.path else None}


def _parse_key_file(path: Path) -> tuple[bytes, str]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise PackageKeyError(f"trust store: cannot read {path} ({exc.strerror or exc})") from None
    lines = [line.strip() for line in data[:_MAX_KEY_FILE].decode("ascii", "replace").splitlines()]
    name = next((line[1:].strip() for line in lines if line.startswith("#")), "")
    body = [line for line in lines if line and not line.startswith("#")]
    try:
        if len(data) > _MAX_KEY_FILE or len(body) != 1:
            raise ValueError
        key = bytes.fromhex(body[0])
        if len(key) != 32:
            raise ValueError
    except ValueError:
        raise PackageKeyError(f"trust store: {path} is not a key file (64 hex digits, then '# name')") from None
    if path.stem != key_id(key):
        raise PackageKeyError(f"trust store: {path} holds key {key_id(key)}, not the one its name says")
    return key, name


class TrustStore:
    """The trusted keys of this machine and user, plus any added for one call (``extra``)."""

    def __init__(self, dirs: Iterable[tuple[str, Path]], extra: Iterable[bytes] = ()) -> None:
        self.dirs = list(dirs)
        self.extra = [TrustedKey(load_public_key(k), "call") for k in extra]

    @classmethod
    def default(cls, extra: Iterable[bytes | str] = ()) -> TrustStore:
        """$HOTPATCH_TRUST_DIR alone if set, else the system store and the user's."""
        keys = [load_public_key(k) for k in extra]
        override = os.environ.get(ENV_TRUST_DIR)
        if override:
            return cls([("env", Path(override).expanduser())], keys)
        return cls([("system", system_trust_dir()), ("user", user_trust_dir())], keys)

    def writable_dir(self, scope: str) -> tuple[str, Path]:
        """(scope, directory) that ``add`` writes to for ``scope``: $HOTPATCH_TRUST_DIR stands for the user's."""
        for name, path in self.dirs:
            if name == scope or (name == "env" and scope == "user"):
                return name, path
        raise PackageKeyError(f"trust store: no {scope} location while ${ENV_TRUST_DIR} is set")

    def keys(self) -> list[TrustedKey]:
        """Every trusted key, each once (the first location naming it wins), then the per-call ones."""
        found: dict[bytes, TrustedKey] = {}
        for scope, directory in self.dirs:
            try:
                check_private_dir(directory, shared_ok=True)
                paths = sorted(directory.glob("*.pub"))
            except FileNotFoundError:
                continue
            except UnsafePathError as exc:
                raise PackageKeyError(f"trust store refused: {exc}") from None
            if len(paths) > _MAX_KEYS:
                raise PackageKeyError(f"trust store: {directory} holds more than {_MAX_KEYS} keys")
            for path in paths:
                key, name = _parse_key_file(path)
                found.setdefault(key, TrustedKey(key, scope, name, path))
        for extra in self.extra:
            found.setdefault(extra.key, extra)
        return list(found.values())

    def raw_keys(self) -> frozenset[bytes]:
        return frozenset(k.key for k in self.keys())

    def lookup(self, key: bytes | None) -> TrustedKey | None:
        if key is None:
            return None
        return next((k for k in self.keys() if k.key == key), None)

    def add(self, key_text: str, name: str = "", scope: str = "user") -> TrustedKey:
        """Trust a key (64 hex digits or a key file) in the user's (or the system) store."""
        key = load_public_key(key_text)
        if "\n" in name or "\r" in name:
            raise PackageKeyError("a key's name is one line")
        scope, directory = self.writable_dir(scope)
        try:
            if scope == "system":
                ensure_private_dir(directory, 0o755, shared_ok=True)
            else:
                ensure_private_dir(directory)
            path = directory / f"{key_id(key)}.pub"
            write_atomic(path, (key.hex() + "\n" + (f"# {name}\n" if name else "")).encode(), 0o644)
        except OSError as exc:
            raise PackageKeyError(f"trust store: cannot write to {directory}: {exc.strerror or exc}") from None
        return TrustedKey(key, scope, name, path)

    def remove(self, which: str) -> list[TrustedKey]:
        """Stop trusting a key, named by its key id (or a prefix of 8+ hex digits), fingerprint or hex."""
        which = which.strip().lower()
        if len(which) < 8:
            raise PackageKeyError("name a key by at least 8 hex digits of its id")
        matches = [k for k in self.keys() if k.scope != "call" and
                   (k.fingerprint.startswith(which) or k.key.hex() == which)]
        if len({k.key for k in matches}) > 1:
            raise PackageKeyError(f"{which} names {len(matches)} keys; give more digits")
        if not matches:
            raise PackageKeyError(f"no trusted key {which}")
        for trusted in matches:
            assert trusted.path is not None
            try:
                os.unlink(trusted.path)
            except OSError as exc:
                raise PackageKeyError(f"trust store: cannot remove {trusted.path}: {exc.strerror or exc}") from None
        return matches


def check_trust(package: Package, trusted: Iterable[bytes], allow_unsigned: bool = False) -> None:
    """Raise unless the package may be applied: signed by a trusted key, or unsigned and allowed."""
    state = signature_state_of(package)
    if state == "invalid":
        raise PackageSignatureError(f"package {package_id_of(package)}: the signature does not verify")
    if state == "unsigned":
        if not allow_unsigned:
            raise PackageUnsignedError(
                f"package {package_id_of(package)} is unsigned (--allow-unsigned admits unsigned packages)"
            )
        return
    assert package.signer_public_key is not None
    if package.signer_public_key not in frozenset(trusted):
        raise PackageUntrustedError(
            f"package {package_id_of(package)} is signed by key {key_id(package.signer_public_key)}, which is not "
            f"trusted (`hotpatch trust add`, or --trust for one call)"
        )


def signer_json(package: Package, store: TrustStore) -> dict[str, object]:
    """Who signed a package and whether this machine trusts them (``inspect``)."""
    key = package.signer_public_key
    if key is None:
        return {"key_id": None, "fingerprint": None, "trusted": False, "trusted_as": None}
    trusted = store.lookup(key)
    return {"key_id": key_id(key), "fingerprint": fingerprint(key), "trusted": trusted is not None,
            "trusted_as": {"scope": trusted.scope, "name": trusted.name} if trusted else None}
