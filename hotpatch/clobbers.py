"""Registers a changed function writes that its old version left alone.

GCC's interprocedural register allocation (-fipa-ra, on at -O2) lets a caller
keep a value in a volatile register across a call when it knows the callee
never writes that register. The running process's callers were compiled
against the *old* callee; if the new version writes a volatile register the
old one did not, those callers silently lose a value. (kpatch builds with
-fno-ipa-ra for this reason.) MSVC and LLVM do not allocate registers across
functions this way, so the check applies to GCC-built images only.
"""

from __future__ import annotations

import capstone
from capstone import x86_const as x86

from .functions import Function, FunctionTable
from .refkinds import BRANCH_REL8, BRANCH_REL32, CALL_REL32, IAT_CALL, IAT_JUMP

__all__ = ["gcc_built", "volatile_writes", "new_clobbers"]

_FAMILIES = {
    "rax": ("rax", "eax", "ax", "al", "ah"), "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"), "r8": ("r8", "r8d", "r8w", "r8b"), "r9": ("r9", "r9d", "r9w", "r9b"),
    "r10": ("r10", "r10d", "r10w", "r10b"), "r11": ("r11", "r11d", "r11w", "r11b"),
}
_FAMILY_OF = {alias: family for family, aliases in _FAMILIES.items() for alias in aliases}
#: what a call to code the compiler cannot see clobbers, by the Windows x64 convention
ALL_VOLATILE = frozenset(_FAMILIES)


def gcc_built(table: FunctionTable) -> bool:
    """mingw-w64 GCC images: the .CRT section of its runtime, or its version string in the image."""
    image = table.image
    return any(s.name == ".CRT" for s in image.sections) or b"GCC: (" in image.memory


def volatile_writes(table: FunctionTable, function: Function) -> frozenset[str]:
    """Volatile general registers the function may change before it returns (calls count as all)."""
    analysis = table.analysis_of(function)
    for kind, _, _, _, target in analysis.raw_refs:
        leaves = kind in (BRANCH_REL8, BRANCH_REL32) and not any(b <= target < e for b, e in function.ranges)
        if kind in (CALL_REL32, IAT_CALL, IAT_JUMP) or leaves:
            return ALL_VOLATILE
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    written: set[str] = set()
    for begin, end in function.ranges:
        for insn in md.disasm(table.image.read(begin, end - begin), begin):
            if insn.id == x86.X86_INS_CALL:
                return ALL_VOLATILE
            _, writes = insn.regs_access()
            for register in writes:
                family = _FAMILY_OF.get(insn.reg_name(register))
                if family:
                    written.add(family)
    return frozenset(written)


def new_clobbers(baseline: FunctionTable, old: Function, patched: FunctionTable, new: Function) -> frozenset[str]:
    """Volatile registers the new version writes and the old one did not."""
    return volatile_writes(patched, new) - volatile_writes(baseline, old)
