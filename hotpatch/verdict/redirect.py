"""Which redirect strategies a baseline function's entry allows.

In order of preference (docs/APPLY.md, "Redirects"):

- ``short_jmp_padding``: a 2-byte ``jmp rel8`` at the entry into the padding
  before it, where a 5-byte ``jmp rel32`` waits. Writing 2 aligned bytes is
  atomic, so no thread check is needed.
- ``rel32_jmp``: a 5-byte ``jmp rel32`` to code allocated within ±2 GB.
- ``abs_jmp``: a 14-byte ``jmp [rip+0]`` with the address after it.

A strategy is possible when the function and its trailing padding hold the
bytes it writes, no branch inside the function lands inside those bytes (a
thread still running old code could jump into the middle of the redirect), and
no call among them returns inside them (a thread waiting in the callee would
return into the middle of the redirect: ``call rax`` is 2 bytes).
"""

from __future__ import annotations

from ..analysis.api import diff_kernels
from ..analysis.functions import Function, FunctionTable
from .strategy import PADDING_JMP_SIZE, Strategy

__all__ = ["obstacles", "possible_strategies", "redirectable"]

#: the strategies best first with their widths (read for every changed function)
_WIDTHS = tuple((strategy, strategy.width) for strategy in Strategy)
_LONGEST = max(width for _, width in _WIDTHS)
_SHORTEST = min(width for _, width in _WIDTHS)


def possible_strategies(table: FunctionTable, function: Function) -> list[Strategy]:
    """The strategies usable at ``function``'s entry, best first (empty: it cannot be redirected)."""
    blocked = obstacles(table, function)
    return [strategy for strategy, _ in _WIDTHS if strategy not in blocked]


def redirectable(table: FunctionTable, function: Function) -> bool:
    """Whether some strategy is usable at ``function``'s entry (``possible_strategies`` is not empty), mostly
    without decoding: the verdict asks this of every changed function.

    The short jump into the padding overwrites the entry's first two bytes. No return address can lie between
    them (no call instruction is one byte long), so with the padding and the size it needs, only a branch
    landing on the entry's second byte blocks it.
    """
    entry = function.rva
    if function.pad_before >= PADDING_JMP_SIZE and function.size >= Strategy.SHORT_JMP_PADDING.width:
        analysis = table.analysis_of(function)
        second = entry + 1
        if not diff_kernels(table.backend).branch_targets_between(analysis.raw_refs, entry, second + 1) \
                and not any(second in jump_table[3] for jump_table in analysis.raw_tables):
            return True
    return bool(possible_strategies(table, function))


def obstacles(table: FunctionTable, function: Function) -> dict[Strategy, str]:
    """Why each strategy that cannot be used at ``function``'s entry cannot (usable ones are absent)."""
    entry = function.rva
    room = function.size + function.pad_after
    if room < _SHORTEST:  # nothing fits: no landing or return address matters
        inner_targets: set[int] = set()
        return_addresses: set[int] = set()
    else:
        inner_targets = _targets_near_entry(table, function)
        return_addresses = _entry_return_addresses(table, function)
    out = {}
    for strategy, length in _WIDTHS:
        last = entry + length  # a redirect of this length overwrites entry + 1 .. last - 1 past its first byte
        if length > room:
            out[strategy] = f"needs {length} bytes, {room} there"
        elif any(entry < t < last for t in inner_targets):
            out[strategy] = f"a branch lands inside its {length} bytes"
        elif any(entry < r < last for r in return_addresses):
            out[strategy] = f"a call returns inside its {length} bytes"
        elif strategy is Strategy.SHORT_JMP_PADDING and (function.pad_before < PADDING_JMP_SIZE or function.size < 2):
            out[strategy] = f"{function.pad_before} bytes of padding before the entry, {PADDING_JMP_SIZE} needed"
    return out


def _targets_near_entry(table: FunctionTable, function: Function) -> set[int]:
    """Where the function's branches inside it and its jump tables land in the bytes after its entry that the
    longest redirect overwrites (no strategy cares about a landing beyond)."""
    entry = function.rva
    near = entry + _LONGEST
    analysis = table.analysis_of(function)
    targets: set[int] = diff_kernels(table.backend).branch_targets_between(analysis.raw_refs, entry,
                                                                           min(function.end_rva, near))
    for jump_table in analysis.raw_tables:
        targets.update(t for t in jump_table[3] if entry < t < near)
    return targets


def _entry_return_addresses(table: FunctionTable, function: Function) -> set[int]:
    """Where the calls that start in the first bytes a redirect may overwrite return to."""
    end = min(function.end_rva, function.rva + _LONGEST + 15)
    instructions = table.backend.instruction_text(table.image.memory, function.rva, end)
    out = set()
    for (rva, mnemonic, _), following in zip(instructions, instructions[1:] + [(end, "", "")]):
        if rva >= function.rva + _LONGEST:
            break
        if mnemonic.startswith("call") or mnemonic == "lcall":
            out.add(following[0])
    return out
