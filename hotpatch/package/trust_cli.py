"""``hotpatch trust add|list|remove``: the keys whose packages ``hotpatch apply`` accepts.

    hotpatch trust add KEY [--name NAME] [--system]   KEY: 64 hex digits, or a .pub / PEM file
    hotpatch trust list [--json]
    hotpatch trust remove KEY_ID [--json]             a key id (8+ hex digits), fingerprint or key

Bad input (an unreadable key, an unknown id, a store others can write to) is
exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..jsonio import print_answer
from .trust import TrustStore

__all__ = ["add_trust_commands"]


def _print(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    print_answer(document, lines, args.json)


def cmd_trust_add(args: argparse.Namespace) -> int:
    added = TrustStore.default().add(args.key, args.name or "", "system" if args.system else "user")
    _print(args, {"schema": "hotpatch.trust/1", "added": added.to_json()},
           [f"trusted key {added.key_id} ({added.scope}: {added.path})"])
    return 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    store = TrustStore.default()
    keys = store.keys()
    lines = [f"{k.key_id}  {k.scope:<6}  {k.name or '-'}  {k.key.hex()}" for k in keys]
    _print(args, {"schema": "hotpatch.trust/1", "locations": [{"scope": s, "path": str(p)} for s, p in store.dirs],
                  "keys": [k.to_json() for k in keys]},
           lines or ["no trusted key (" + ", ".join(f"{s}: {p}" for s, p in store.dirs) + ")"])
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    removed = TrustStore.default().remove(args.key)
    _print(args, {"schema": "hotpatch.trust/1", "removed": [k.to_json() for k in removed]},
           [f"no longer trusted: {k.key_id} ({k.scope}: {k.path})" for k in removed])
    return 0


def add_trust_commands(subparsers: Any) -> None:
    """Register ``trust`` with its verbs add, list and remove."""
    trust = subparsers.add_parser("trust", help="the keys trusted to sign packages (add, list, remove)")
    verbs = trust.add_subparsers(dest="trust_command", required=True)
    add = verbs.add_parser("add", help="trust a public key (64 hex digits or a key file)")
    add.add_argument("key")
    add.add_argument("--name", help="a label shown by `trust list`")
    add.add_argument("--system", action="store_true", help="in the system store (needs the rights to write it)")
    add.add_argument("--json", action="store_true")
    add.set_defaults(run=cmd_trust_add)
    listing = verbs.add_parser("list", help="every trusted key and where it is kept")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_trust_list)
    remove = verbs.add_parser("remove", help="stop trusting a key")
    remove.add_argument("key", help="key id (8+ hex digits), fingerprint or the key's 64 hex digits")
    remove.add_argument("--json", action="store_true")
    remove.set_defaults(run=cmd_trust_remove)
