"""The test run's package signing key, trusted through a private trust store (tests/conftest.py).

Tests apply packages the way a user does: signed by a key the trust store
holds. The store is a temporary directory named by $HOTPATCH_TRUST_DIR for
the whole session, so this machine's own trusted keys never take part.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hotpatch.package.format import dumps, loads
from hotpatch.package.model import Package
from hotpatch.package.signing import public_key_bytes

SIGNING_KEY = Ed25519PrivateKey.generate()
PUBLIC_KEY = public_key_bytes(SIGNING_KEY)


def signed(package: Package, key: Ed25519PrivateKey = SIGNING_KEY) -> Package:
    """The package as its vendor ships it: serialised, signed, and read back."""
    return loads(dumps(package, sign_key=key))
