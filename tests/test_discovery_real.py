"""Function discovery on real binaries: no start inside an instruction, no data swept as code, code reached
only through addresses found, and the self-diff sweep over MSVC-, GCC- and LLVM-built DLLs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis.flow import terminates
from hotpatch.analysis.functions import FunctionTable, import_thunk_target
from hotpatch.diff.compare import diff
from hotpatch.verdict.rules import decide
from tests.support.realbins import SELF_DIFF_SWEEP, real_binary

pytestmark = [pytest.mark.realbins, pytest.mark.slow]

ZMQ = "zmq/backend/cython/_zmq.*.pyd"
RUST = "cryptography/hazmat/bindings/_rust.pyd"


@pytest.fixture(scope="module")
def zmq_tables() -> tuple:
    return (discover(Image.load(real_binary("pyzmq", "26.0.2", ZMQ))),
            discover(Image.load(real_binary("pyzmq", "26.0.3", ZMQ))))


@pytest.fixture(scope="module")
def rust_table(rust_pyd: Path) -> FunctionTable:
    return discover(Image.load(rust_pyd))


def test_no_thunk_starts_inside_a_rex_tail_jump(zmq_tables: tuple, rust_table: FunctionTable) -> None:
    """``FF 25`` inside MSVC's ``48 FF 25`` tail jump is not an import thunk (20 such starts in _zmq,
    one at 0x58fb0c in _rust.pyd, before)."""
    assert rust_table.at(0x58FB0C) is None
    for table in (zmq_tables[0], rust_table):
        memory = table.image.memory
        thunks = sorted(f.rva for f in table if "thunk" in f.sources)
        assert len(thunks) > 50
        inside = [rva for rva in thunks if 0x40 <= memory[rva - 1] <= 0x4F and rva - 6 not in thunks]
        assert inside == []
        # the tail jump belongs to the function holding it, which decodes it whole
        for rva in (rva - 1 for rva in thunks if memory[rva - 1] == 0x48):
            owner = table.containing(rva)
            if owner is not None and owner.rva != rva:
                assert rva in table.analysis_of(owner).insn_rvas, hex(rva)


def test_pyzmq_patch_release_with_identical_code_is_a_hotpatch(zmq_tables: tuple) -> None:
    """26.0.2 -> 26.0.3: byte-identical .text; a switch's byte table in a .pdata fragment used to be
    swept as code, giving an unsupported_reference and NEW_BASELINE."""
    baseline, patched = zmq_tables
    assert baseline.image.memory[0x1000:0x96c3e] == patched.image.memory[0x1000:0x96c3e]
    result = diff(baseline, patched)
    assert decide(result).status == "HOTPATCH", decide(result).reasons
    assert decide(result).reasons == ()
    # What still differs is real: the build path in assert strings (rodata) and the bundled msvcp140 DLL's
    # new hashed name (imports, and the import thunks that jump through them).
    assert {f.changes for f in result.functions if f.status == "changed"} <= {("rodata",), ("code", "import")}
    for entry in result.by_status("removed") + result.by_status("added"):
        side = entry.baseline or entry.patched
        table = baseline if entry.baseline else patched
        assert import_thunk_target(table, side) is not None, side


def test_code_reached_only_through_addresses_is_found(zmq_tables: tuple) -> None:
    """SMDA finds ~290 starts in _zmq that .pdata, exports, pointers and calls miss: lea targets,
    32-bit addresses in data (C++ exception tables), funclets after int3 padding."""
    table = zmq_tables[0]
    counts = table.counts_by_source()
    assert counts["lea"] + counts["rva32"] + counts["gap"] >= 250, counts
    for rva in (0x2EF30, 0x2EF50, 0x35A90, 0x95020):  # unwind funclets, each checked by hand
        function = table.at(rva)
        assert function is not None and "pdata" not in function.sources, hex(rva)
    assert table.coverage()[".text"] > 0.998
    assert not table.overlaps()


def test_functions_without_pdata_end_where_no_path_goes_on(zmq_tables: tuple) -> None:
    """A function without .pdata never holds bytes after an instruction that does not fall through
    unless one of its branches goes there: tables and constants behind its code are not its code."""
    table = zmq_tables[0]
    memory = table.image.memory
    checked = 0
    for function, analysis in zip(table.functions, table.analyses):
        if "pdata" in function.sources:
            continue
        rvas = analysis.insn_rvas
        targets = {ref[4] for ref in analysis.raw_refs if ref[0] in (1, 2)}
        targets |= {t for table_ in analysis.raw_tables for t in table_[3]}
        for index, rva in enumerate(rvas[:-1]):
            if terminates(memory, rva, rvas[index + 1]):
                assert any(t >= rvas[index + 1] for t in targets), hex(function.rva)
        checked += 1
    assert checked > 500


def test_no_references_to_nowhere(rust_table: FunctionTable) -> None:
    """Data decoded as code makes references outside the image: on cryptography 43.0.0 -> 43.0.1 they gave
    85 unsupported_reference reasons (12 after). Of _rust.pyd's ~20,000 functions, at most a handful
    (hand-written assembly with constants inside its .pdata ranges) still do."""
    table = rust_table
    image, iat = table.image, table.context.iat
    nowhere = [f.rva for f, analysis in zip(table.functions, table.analyses)
               if any(ref[4] != 0 and image.section_from_rva(ref[4]) is None and ref[4] not in iat
                      for ref in analysis.raw_refs)]
    assert len(nowhere) <= 5, [hex(rva) for rva in nowhere]
    assert len(table) > 20000 and not table.overlaps()


@pytest.mark.parametrize("dist,version,pattern,toolchain", SELF_DIFF_SWEEP,
                         ids=[f"{entry[3]}-{entry[2].split('/')[-1].split('.')[0]}" for entry in SELF_DIFF_SWEEP])
def test_self_diff_is_zero(dist: str, version: str, pattern: str, toolchain: str) -> None:
    path = real_binary(dist, version, pattern)
    result = diff(discover(Image.load(path)), discover(Image.load(path)))
    summary = result.summary()
    assert summary["changed"] == summary["added"] == summary["removed"] == 0, [
        (f.status, f.name, f.changes) for f in result.functions if f.status != "unchanged"][:10]
    assert decide(result).status == "HOTPATCH", decide(result).reasons
    assert summary["unchanged"] > 0


def test_sweep_spans_toolchains() -> None:
    assert len(SELF_DIFF_SWEEP) >= 30
    assert set(Counter(entry[3] for entry in SELF_DIFF_SWEEP)) == {"msvc", "gcc", "llvm"}


def test_rip_relative_displacements_are_four_bytes_after_a_66_prefix() -> None:
    """numpy 2.1.0 -> 2.1.1 `_operand_flag_tests`: the one changed function reads changed read-only data
    with ``movdqa xmm0, [rip+X]`` (66 0F 6F 05 disp32), for which capstone 5 reports a 2-byte
    displacement: the builder refused the "2-byte reference" and the fingerprint masked half of it."""
    from hotpatch.analysis.refkinds import RIP_RELATIVE
    from hotpatch.package.builder import build_package

    pattern = "numpy/_core/_operand_flag_tests.*.pyd"
    result = diff(real_binary("numpy", "2.1.0", pattern), real_binary("numpy", "2.1.1", pattern))
    memory = result.patched.image.memory
    prefixed = 0
    for analysis in result.patched.analyses:
        for kind, insn_rva, _, size, _ in analysis.raw_refs:
            if kind == RIP_RELATIVE:
                assert size == 4, hex(insn_rva)
                prefixed += memory[insn_rva] == 0x66
    assert prefixed > 0
    assert decide(result).status == "HOTPATCH"
    package = build_package(result)
    assert package.blobs and package.sites
