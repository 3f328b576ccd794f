"""Caches that live as long as an object but are kept outside it (no module writes into another's __dict__).

The verdict's checks (clobbers, ownership) remember per-table facts this way: the table stays plain
data, and its caches go when it does.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["cache_of"]

_CACHES: weakref.WeakKeyDictionary[Any, dict[str, dict[Any, Any]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def cache_of(owner: object, name: str) -> dict[Any, Any]:
    """The dict called ``name`` that lives as long as ``owner`` (hashable by identity), empty at first."""
    with _LOCK:
        per_owner = _CACHES.get(owner)
        if per_owner is None:
            per_owner = _CACHES[owner] = {}
        return per_owner.setdefault(name, {})
