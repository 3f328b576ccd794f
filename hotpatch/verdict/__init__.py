"""``decide(result) -> Verdict``: HOTPATCH or NEW_BASELINE, with one reason per blocking item.

Layout evidence, register clobbers, ownership of heap memory in fields (the scan
compiled, ``_ownership.pyx``, and its pure twin ``_ownership_reference.py``), redirect
strategies. May import ``diff``, ``analysis``, ``pe`` and the shared leaves.
"""
