"""Patch packages (.hpk): the model (plain data), the byte format (reading, writing, identity) and signatures.

    package = load("fix.hpk", trusted_keys=[load_public_key("release.pub")])   # hotpatch.package.format
    data = dumps(package, sign_key=load_private_key("release.key"))

The format is specified in docs/FORMAT.md; native/hpk/ holds its C reader.
"""

from __future__ import annotations

from . import model
from .format import MAGIC, Section, signed_message
from .model import *  # noqa: F403 - the model's names are the package's
from .signing import generate_keypair, load_private_key, load_public_key, write_keypair

__all__ = [
    *model.__all__,
    "MAGIC",
    "Section",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "signed_message",
    "write_keypair",
]
