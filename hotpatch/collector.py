"""Pausing Python's cyclic garbage collector around allocation-heavy work.

Loading, discovery and diff allocate millions of small tuples and no cycles
worth collecting on the way. Every full collection walks all live objects
(both images' tables included), which was about a third of the end-to-end
diff time; paused, the work pays one young-generation pass at the end.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
