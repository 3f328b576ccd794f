"""``decide(result) -> Verdict``: HOTPATCH or NEW_BASELINE, with one reason per blocking item.

Layout evidence, register clobbers, redirect strategies. May import ``diff``,
``analysis``, ``pe`` and the shared leaves.
"""
