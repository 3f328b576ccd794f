"""The machine code the engine writes itself, and which bytes go where at a patch site.

Every stub is assembly text assembled with keystone at the address it will
run from (tests/test_redirect_stubs.py pins the bytes):

- ``jmp rel8`` at a function's entry into its padding (SHORT_JMP_PADDING),
- ``jmp rel32`` into the padding or at the entry (SHORT_JMP_PADDING, REL32_JMP),
- ``jmp qword ptr [rip]`` followed by the 64-bit target (ABS_JMP, and the relay
  thunk through which new code reaches an import farther than 2 GiB away).

Keystone silently wraps a relative jump whose target is out of reach, so every
encoding is decoded again and its target compared with the one asked for.

A site's redirect is a tuple of ``Patch`` (address, original bytes, redirect
bytes). ``transition_writes`` turns "these patches are in memory" into "those
patches are": the commit writes that apply, stack or roll back a package.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from .. import x86
from ..errors import FixupError
from ..package.model import PADDING_JMP_SIZE, PatchSite, Strategy
from .backend import CommitWrite

__all__ = [
    "JMP_ABS_ASM",
    "JMP_REL_ASM",
    "Patch",
    "SiteRedirect",
    "assemble",
    "fits_rel32",
    "jmp_abs",
    "jmp_rel8",
    "jmp_rel32",
    "plan_site",
    "relay_thunk",
    "transition_writes",
]

#: A relative jump; keystone picks rel8 (eb) or rel32 (e9) by distance.
JMP_REL_ASM = "jmp {target:#x}"
#: An absolute jump through the 8 bytes that follow it: ff 25 00 00 00 00, then the target.
JMP_ABS_ASM = "jmp qword ptr [rip]\n.quad {target:#x}"

ROLE_ENTRY = "entry"
ROLE_PADDING = "padding"


@lru_cache(maxsize=4096)
def assemble(text: str, va: int = 0) -> bytes:
    """Assemble ``text`` as code placed at ``va`` (cached: sites repeat the same few stubs)."""
    return x86.assemble(text, va)


def fits_rel32(value: int) -> bool:
    return -(1 << 31) <= value < (1 << 31)


def jmp_rel8(va: int, target: int) -> bytes:
    """``jmp rel8`` at ``va`` to ``target`` (2 bytes)."""
    if not -128 <= target - (va + 2) <= 127:
        raise FixupError(f"short jump at {va:#x} cannot reach {target:#x}")
    code = assemble(JMP_REL_ASM.format(target=target), va)
    _check_relative(code, 0xEB, 2, va, target)
    return code


def jmp_rel32(va: int, target: int) -> bytes:
    """``jmp rel32`` at ``va`` to ``target`` (5 bytes)."""
    if not fits_rel32(target - (va + 5)):
        raise FixupError(f"jmp rel32 at {va:#x} cannot reach {target:#x} (more than 2 GiB away)")
    if -128 <= target - (va + 2) <= 127:
        # keystone would pick the 2-byte form; never the case for code in its own allocation
        raise FixupError(f"jmp at {va:#x} to {target:#x} is short; a rel32 redirect needs a farther target")
    code = assemble(JMP_REL_ASM.format(target=target), va)
    _check_relative(code, 0xE9, 5, va, target)
    return code


def jmp_abs(target: int) -> bytes:
    """``jmp qword ptr [rip]`` and the 8-byte target (14 bytes, position independent)."""
    if not 0 <= target < 1 << 64:
        raise FixupError(f"absolute jump target {target:#x} is not a 64-bit address")
    code = assemble(JMP_ABS_ASM.format(target=target), 0)
    if code[:6] != b"\xff\x25\x00\x00\x00\x00" or struct.unpack_from("<Q", code, 6)[0] != target or len(code) != 14:
        raise AssertionError(f"keystone assembled {code.hex()} for an absolute jump to {target:#x}")
    return code


def relay_thunk(target: int) -> bytes:
    """The thunk a rel32 call or jump in new code goes through to reach a far ``target``."""
    return jmp_abs(target)


def _check_relative(code: bytes, opcode: int, size: int, va: int, target: int) -> None:
    if len(code) != size or code[0] != opcode:
        raise AssertionError(f"keystone assembled {code.hex()} for a jump from {va:#x} to {target:#x}")
    displacement = int.from_bytes(code[1:], "little", signed=True)
    if va + size + displacement != target:
        raise AssertionError(f"keystone's jump at {va:#x} lands at {va + size + displacement:#x}, not {target:#x}")


# --------------------------------------------------------------------------
# Redirects of patch sites
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """Bytes a redirect puts at ``va`` instead of ``original``.

    ``atomic``: the write is safe without suspending threads (the jump into
    the padding before anything jumps there; an aligned 2-byte short jump).
    """

    va: int
    original: bytes
    redirect: bytes
    role: str = ROLE_ENTRY
    atomic: bool = False

    def __post_init__(self) -> None:
        if len(self.original) != len(self.redirect) or not self.redirect:
            raise ValueError(f"patch at {self.va:#x}: original and redirect must have the same non-zero length")

    @property
    def end(self) -> int:
        return self.va + len(self.redirect)

    def to_json(self) -> dict[str, object]:
        return {
            "va": self.va,
            "role": self.role,
            "original": self.original.hex(),
            "redirect": self.redirect.hex(),
            "atomic": self.atomic,
        }

    @classmethod
    def from_json(cls, data: dict) -> Patch:
        return cls(
            int(data["va"]),
            bytes.fromhex(data["original"]),
            bytes.fromhex(data["redirect"]),
            str(data.get("role", ROLE_ENTRY)),
            bool(data.get("atomic", False)),
        )


@dataclass(frozen=True)
class SiteRedirect:
    """One site's redirect as planned for this process: the strategy chosen and its patches."""

    rva: int
    function: str
    strategy: Strategy
    target_va: int
    patches: tuple[Patch, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "rva": self.rva,
            "function": self.function,
            "strategy": self.strategy.name,
            "target_va": self.target_va,
            "patches": [p.to_json() for p in self.patches],
        }

    @classmethod
    def from_json(cls, data: dict) -> SiteRedirect:
        return cls(
            int(data["rva"]),
            str(data["function"]),
            Strategy[data["strategy"]],
            int(data["target_va"]),
            tuple(Patch.from_json(p) for p in data["patches"]),
        )


def plan_site(site: PatchSite, module_base: int, target_va: int) -> SiteRedirect:
    """The first of the site's strategies (preferred, then fallbacks) that works from here to ``target_va``."""
    va = module_base + site.rva
    reasons = []
    for strategy in (site.strategy, *site.fallbacks):
        try:
            patches = _patches(site, strategy, va, module_base, target_va)
        except FixupError as exc:
            reasons.append(f"{strategy.name}: {exc}")
            continue
        return SiteRedirect(site.rva, site.function, strategy, target_va, patches)
    raise FixupError(f"site {site.function} ({va:#x}): no redirect strategy fits: " + "; ".join(reasons))


def _patches(site: PatchSite, strategy: Strategy, va: int, module_base: int, target: int) -> tuple[Patch, ...]:
    if strategy is Strategy.REL32_JMP:
        return (Patch(va, site.expected[:5], jmp_rel32(va, target)),)
    if strategy is Strategy.ABS_JMP:
        return (Patch(va, site.expected[:14], jmp_abs(target)),)
    assert site.padding_rva is not None  # the model guarantees padding for this strategy
    padding_va = module_base + site.padding_rva
    long_jump = Patch(
        padding_va,
        site.padding_expected[:PADDING_JMP_SIZE],
        jmp_rel32(padding_va, target),
        ROLE_PADDING,
        atomic=True,
    )
    # An aligned 2-byte store is atomic; an unaligned one needs the threads stopped.
    short_jump = Patch(va, site.expected[:2], jmp_rel8(va, padding_va), ROLE_ENTRY, atomic=va % 2 == 0)
    return long_jump, short_jump


# --------------------------------------------------------------------------
# From one set of patches to another
# --------------------------------------------------------------------------


def transition_writes(
    old: Iterable[Patch], new: Iterable[Patch], read_byte: Callable[[int], int] | None = None
) -> list[CommitWrite]:
    """The commit writes that turn memory holding the ``old`` patches into memory holding the ``new`` ones.

    Bytes covered by neither are left alone; bytes covered by one side only
    hold the original on the other. Overlapping patches merge into one write.
    With nothing old (a fresh apply), each patch is its own write, the
    padding jumps first, and atomic patches are marked ``no_suspend``.

    A padding jump going back to its original bytes is the one write that a
    thread may be about to execute from its very first byte (it has taken the
    short jump but not yet the long one). The agent only waits for threads
    strictly inside a write, so such a write starts one byte early, rewriting
    that byte with itself, when ``read_byte`` gives it. (Runs of covered
    bytes are maximal, so the byte before one is never part of another write.)
    """
    old, new = list(old), list(new)
    if not old:
        ordered = sorted(new, key=lambda p: (p.role != ROLE_PADDING, p.va))
        only_atomic = all(p.atomic for p in ordered)
        return [CommitWrite(p.va, p.original, p.redirect, no_suspend=only_atomic and p.atomic) for p in ordered]
    original: dict[int, int] = {}
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    for side, patches in ((before, old), (after, new)):
        for patch in patches:
            for i in range(len(patch.redirect)):
                va = patch.va + i
                known = original.setdefault(va, patch.original[i])
                if known != patch.original[i]:
                    raise FixupError(f"two redirects disagree about the original byte at {va:#x}")
                side[va] = patch.redirect[i]
    new_padding = {p.va for p in new if p.role == ROLE_PADDING}
    restored_padding = {p.va for p in old if p.role == ROLE_PADDING and p.va not in new_padding}
    writes = []
    for start, end in _runs(original):
        expected = bytes(before.get(va, original[va]) for va in range(start, end))
        wanted = bytes(after.get(va, original[va]) for va in range(start, end))
        if expected == wanted:
            continue
        if start in restored_padding and read_byte is not None and start - 1 not in original:
            guard = bytes([read_byte(start - 1)])
            expected, wanted, start = guard + expected, guard + wanted, start - 1
        writes.append(CommitWrite(start, expected, wanted))
    return writes


def _runs(covered: dict[int, int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for va in sorted(covered):
        if runs and runs[-1][1] == va:
            runs[-1] = (runs[-1][0], va + 1)
        else:
            runs.append((va, va + 1))
    return runs

