"""Redirect strategies: how a patch site's entry is sent to its new code (docs/FORMAT.md, "Patch sites").

One enum for every stage: the verdict says which strategies a function's
entry allows, the builder writes them into the package, the engine plans
and writes them. Its values are the names the diff and build JSON use; the
package format stores each as its one-byte wire code.
"""

from __future__ import annotations

import enum

__all__ = ["PADDING_JMP_SIZE", "Strategy"]

#: the jmp rel32 SHORT_JMP_PADDING writes into the padding right before the entry
PADDING_JMP_SIZE = 5


class Strategy(enum.StrEnum):
    """Strategies in order of preference (the builder tries them best first)."""

    SHORT_JMP_PADDING = "short_jmp_padding"  # 2-byte jmp rel8 into padding, where a 5-byte jmp rel32 waits
    REL32_JMP = "rel32_jmp"  # 5-byte jmp rel32 to code within +-2 GiB
    ABS_JMP = "abs_jmp"  # 14 bytes: jmp [rip+0] followed by the 8-byte address

    @property
    def width(self) -> int:
        """Bytes the strategy overwrites at the site itself."""
        return _WIDTH[self]

    @property
    def code(self) -> int:
        """The strategy's byte in a package's site table."""
        return _CODE[self]

    @classmethod
    def from_code(cls, code: int) -> Strategy:
        """The strategy a site table's byte names (``KeyError`` if none)."""
        return _BY_CODE[code]


_WIDTH = {Strategy.SHORT_JMP_PADDING: 2, Strategy.REL32_JMP: 5, Strategy.ABS_JMP: 14}
_CODE = {Strategy.SHORT_JMP_PADDING: 1, Strategy.REL32_JMP: 2, Strategy.ABS_JMP: 3}
_BY_CODE = {code: strategy for strategy, code in _CODE.items()}
