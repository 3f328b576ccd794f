"""Side-by-side disassembly of a changed function: baseline and patched rows aligned, references as names.

Rows follow the diff's own instruction alignment (``InstructionStreams.aligned``):
paired instructions share a row, unpaired ones fill the rows between pairs.
Every reference operand is replaced by a name that means the same thing in
both images: an import by ``dll!name``, a function by its baseline label (a
patched function is named after its baseline twin), data by its string
contents or by the baseline item it maps to, a branch inside the function by
the baseline instruction it lands on (``.L12``; a patched target the
alignment does not pair gets a primed label). A row whose two sides then read
the same is unchanged even if every address in it moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..analysis.refkinds import IAT_CALL, IAT_JUMP, RIP_RELATIVE
from ..diff.targets import CODE, DATA, FUNCTION, IMPORT, SELF, TargetClassifier
from ..x86 import disassembler

if TYPE_CHECKING:
    from ..analysis.functions import Function, FunctionTable
    from ..diff.result import DiffResult, FunctionDiff

__all__ = ["Disassembler", "Row", "Segment"]

#: a segment of instruction text: (text, None) plain, or (name, anchor key or "") for a reference
Segment = tuple[str, str | None]
_RIP = re.compile(r"\[rip [+-] 0x[0-9a-f]+\]")
_RIP_KINDS = (RIP_RELATIVE, IAT_CALL, IAT_JUMP)
_PRINTABLE = re.compile(rb"[\x20-\x7e]{4,60}\x00")


@dataclass(frozen=True)
class Row:
    """One line of the side-by-side view; ``state`` is same, ref (only names differ), changed, deleted, inserted."""

    state: str
    left: tuple[int, list[Segment]] | None
    right: tuple[int, list[Segment]] | None


class _Side:
    """Naming of one image's reference targets."""

    def __init__(self, table: FunctionTable, function_names: dict[int, str], data_names: dict[int, str]) -> None:
        self.table = table
        self.image = table.image
        self.targets = TargetClassifier(table)
        self.function_names = function_names
        self.data_names = data_names
        self.md = disassembler()
        self.symbols = {s.rva: s.name for s in self.image.symbols if not s.is_function}

    def text(self, rva: int) -> str:
        code = self.image.memory[rva:rva + 16]
        for _, _, mnemonic, operands in self.md.disasm_lite(code, self.image.image_base + rva, 1):
            return f"{mnemonic} {operands}".strip()
        return "(bad)"

    def name(self, function: Function, target: int, labels: dict[int, str]) -> tuple[str, str | None]:
        kind, value = self.targets.classify(function, target)
        if kind == SELF:
            return labels.get(target, f"+{value:#x}"), ""
        if kind == IMPORT:
            return str(value), ""
        if kind == FUNCTION:
            return self.function_names.get(target) or self._label(target), str(target)
        if kind == CODE:
            owner = self.table.containing(target)
            if owner is not None:
                return f"{self.function_names.get(owner.rva) or owner.label}+{target - owner.rva:#x}", None
        if kind == DATA:
            return self._data_name(target), ""
        return f"{target:#x}", None

    def _label(self, rva: int) -> str:
        found = self.table.at(rva)
        return found.label if found else f"sub_{rva:x}"

    def _data_name(self, rva: int) -> str:
        found = self.data_names.get(rva) or self.symbols.get(rva)
        if found:
            return found
        match = _PRINTABLE.match(self.image.memory, rva)
        if match:
            return repr(match.group()[:-1].decode())
        section = self.image.section_from_rva(rva)
        return f"{section.name.lstrip('.') if section else 'data'}_{rva:x}"

    def texts(self, function: Function) -> dict[int, str]:
        """Instruction text by RVA, one linear sweep per range (the analysis' starts are looked up in it)."""
        out: dict[int, str] = {}
        base = self.image.image_base
        for begin, end in function.ranges:
            for address, _, mnemonic, operands in self.md.disasm_lite(self.image.memory[begin:end], base + begin):
                out[address - base] = f"{mnemonic} {operands}".strip()
        return out

    def segments(self, function: Function, rva: int, text: str | None, refs: list[tuple],
                 labels: dict[int, str]) -> list[Segment]:
        if text is None:
            text = self.text(rva)  # the sweep fell out of step (data in code): decode this one alone
        if not refs:
            return [(text, None)]
        names: dict[str, tuple[str, str | None]] = {}
        base = self.image.image_base
        for ref in refs:
            name = self.name(function, ref[4], labels)
            match = _RIP.search(text) if ref[0] in _RIP_KINDS else None
            if match:
                names[match.group()] = (f"[{name[0]}]", name[1])
            for value in (base + ref[4], ref[4]):
                names.setdefault(f"{value:#x}", name)
        out: list[Segment] = []
        position = 0
        while True:
            # the earliest, then longest, operand text that names a target
            found = min(((at, -len(key), key) for key in names if (at := text.find(key, position)) >= 0),
                        default=None)
            if found is None:
                break
            at, _, key = found
            end = at + len(key)
            if end < len(text) and text[end] in "0123456789abcdef":
                position = end  # a longer number that merely starts with this one
                continue
            if at > position:
                out.append((text[position:at], None))
            out.append(names[key])
            position = end
        if position < len(text):
            out.append((text[position:], None))
        return out


class Disassembler:
    """Side-by-side rows of the functions of one diff."""

    def __init__(self, result: DiffResult) -> None:
        self.result = result
        reverse_functions = {b: a for a, b in result.function_map.items()}
        names_a = {f.rva: f.label for f in result.baseline}
        names_b = {f.rva: names_a.get(reverse_functions.get(f.rva, -1)) or f.label for f in result.patched}
        symbols = {s.rva: s.name for s in result.baseline.image.symbols if not s.is_function}
        data_a = {rva: symbols.get(rva) or f"{self._section(result.baseline, rva)}_{rva:x}" for rva in result.data_map}
        data_b = {b: data_a[a] for a, b in result.data_map.items()}
        self.sides = (_Side(result.baseline, names_a, data_a), _Side(result.patched, names_b, data_b))

    @staticmethod
    def _section(table: FunctionTable, rva: int) -> str:
        section = table.image.section_from_rva(rva)
        return section.name.lstrip(".") if section else "data"

    def rows(self, entry: FunctionDiff, limit: int) -> tuple[list[Row], int]:
        """Up to ``limit`` rows of the function's side-by-side view, and how many rows it has in all."""
        fa, fb = entry.baseline, entry.patched
        if fa is not None and fb is not None and self.result.streams is not None:
            pairs = self.result.streams.aligned(fa, fb)
        else:
            pairs = []
        insns_a = list(self.result.baseline.analysis_of(fa).insn_rvas) if fa else []
        insns_b = list(self.result.patched.analysis_of(fb).insn_rvas) if fb else []
        labels_a = {rva: f".L{i}" for i, rva in enumerate(insns_a)}
        paired_b = {j: i for i, j in pairs}
        labels_b = {rva: f".L{paired_b[j]}" if j in paired_b else f".L{j}'" for j, rva in enumerate(insns_b)}
        refs_a = self._refs(self.result.baseline, fa)
        refs_b = self._refs(self.result.patched, fb)
        plan: list[tuple[int | None, int | None]] = []
        i = j = 0
        for pi, pj in [*pairs, (len(insns_a), len(insns_b))]:
            gap_a, gap_b = list(range(i, pi)), list(range(j, pj))
            for k in range(max(len(gap_a), len(gap_b))):
                plan.append((gap_a[k] if k < len(gap_a) else None, gap_b[k] if k < len(gap_b) else None))
            if pi < len(insns_a):
                plan.append((pi, pj))
            i, j = pi + 1, pj + 1
        paired = set(pairs)
        texts_a = self.sides[0].texts(fa) if fa else {}
        texts_b = self.sides[1].texts(fb) if fb else {}
        rows = []
        for a, b in plan[:limit]:
            left = right = None
            if a is not None:
                rva = insns_a[a]
                left = (rva - fa.rva, self.sides[0].segments(fa, rva, texts_a.get(rva), refs_a.get(rva, []), labels_a))
            if b is not None:
                rva = insns_b[b]
                right = (rva - fb.rva, self.sides[1].segments(fb, rva, texts_b.get(rva), refs_b.get(rva, []),
                                                              labels_b))
            rows.append(Row(_state(a, b, left, right, (a, b) in paired), left, right))
        return rows, len(plan)

    @staticmethod
    def _refs(table: FunctionTable, function: Function | None) -> dict[int, list[tuple]]:
        out: dict[int, list[tuple]] = {}
        if function is not None:
            for ref in table.analysis_of(function).raw_refs:
                out.setdefault(ref[1], []).append(ref)
        return out


def _state(a: int | None, b: int | None, left: Any, right: Any, paired: bool) -> str:
    if a is None:
        return "inserted"
    if b is None:
        return "deleted"
    if not paired:
        return "changed"
    same = [s[0] for s in left[1]] == [s[0] for s in right[1]]
    return "same" if same else "ref"
