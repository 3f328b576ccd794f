"""Ed25519 keys and signatures for patch packages (the ``cryptography`` package).

A package signature signs ``SIGNATURE_CONTEXT + content_sha256`` (48 bytes):
the fixed context keeps a package key's signatures from meaning anything
elsewhere, and signing the hash lets a reader that has already checked the
hash (the C reader, the agent) verify without a second pass over the content.

Private keys are PKCS#8 PEM files; public keys travel as 64 hex digits (raw
32-byte Ed25519 keys), or as PEM SubjectPublicKeyInfo files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import PackageKeyError

__all__ = [
    "SIGNATURE_CONTEXT",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "normalize_public_keys",
    "public_key_bytes",
    "sign_digest",
    "verify",
    "write_keypair",
]

SIGNATURE_CONTEXT = b"hotpatch.hpk.v1\x00"

_MAX_KEY_FILE = 64 * 1024


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair() -> tuple[bytes, str]:
    """A new key pair: (private key as unencrypted PKCS#8 PEM, public key as 64 hex digits)."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, public_key_bytes(private_key).hex()


def write_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new key pair (the private key readable by its owner only); returns the public key hex."""
    pem, public_hex = generate_keypair()
    private_path = Path(private_path)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise PackageKeyError(f"{private_path}: cannot create ({exc.strerror or exc})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    Path(public_path).write_text(public_hex + "\n")
    return public_hex


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise PackageKeyError(f"{path}: cannot read key ({exc.strerror or exc})") from None
    if len(data) > _MAX_KEY_FILE:
        raise PackageKeyError(f"{path}: too large to be a key file")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PKCS#8 PEM file."""
    path = Path(path)
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    except Exception as exc:  # cryptography raises its own types for unsupported key formats
        raise PackageKeyError(f"{path}: cannot load private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageKeyError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def _public_from_text(text: str) -> bytes | None:
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            return None
    return None


def load_public_key(text_or_path: str | Path | bytes) -> bytes:
    """A raw 32-byte Ed25519 public key from 64 hex digits, raw bytes, or a file holding hex or PEM."""
    if isinstance(text_or_path, bytes):
        if len(text_or_path) == 32:
            return text_or_path
        raise PackageKeyError(f"a raw public key is 32 bytes, not {len(text_or_path)}")
    if isinstance(text_or_path, str):
        key = _public_from_text(text_or_path)
        if key is not None:
            return key
    path = Path(text_or_path)
    data = _read_key_file(path)
    if b"-----BEGIN" in data:
        try:
            public = serialization.load_pem_public_key(data)
        except Exception as exc:  # ValueError or cryptography's UnsupportedAlgorithm
            raise PackageKeyError(f"{path}: not a PEM public key ({type(exc).__name__})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise PackageKeyError(f"{path}: not an Ed25519 public key ({type(public).__name__})")
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = _public_from_text(data.decode("ascii", errors="replace"))
    if key is None:
        raise PackageKeyError(f"{path}: expected 64 hex digits or a PEM public key")
    return key


def normalize_public_keys(keys: Iterable[bytes | str]) -> frozenset[bytes]:
    """Trusted keys as a set of raw 32-byte keys (each given raw or as 64 hex digits)."""
    if isinstance(keys, bytes | str):
        raise PackageKeyError("trusted keys: expected a list of keys, got a single value")
    result = set()
    for key in keys:
        raw = _public_from_text(key) if isinstance(key, str) else key
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise PackageKeyError(f"trusted key {key!r}: expected 32 raw bytes or 64 hex digits")
        result.add(raw)
    return frozenset(result)


def sign_digest(private_key: Ed25519PrivateKey, content_sha256: bytes) -> tuple[bytes, bytes]:
    """(public key, signature) over the package content hash."""
    return public_key_bytes(private_key), private_key.sign(SIGNATURE_CONTEXT + content_sha256)


def verify(public_key: bytes, signature: bytes, content_sha256: bytes) -> bool:
    """Whether ``signature`` by ``public_key`` signs the package with this content hash."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, SIGNATURE_CONTEXT + content_sha256)
    except (InvalidSignature, ValueError):
        return False
    return True
