"""The apply engine against running processes under Wine, through the native agent.

host.exe runs body_change/baseline.dll with 8 threads calling scale(7),
add(2, 3) and scale_then_xor(10, 1) in a tight loop for the whole module.
Packages are built here with the model (code assembled with keystone), so
these tests do not depend on the package builder. Every test leaves the
process as it found it; the host fixture checks at the end that the host
never crashed and only ever computed a value of the baseline or of one of
the packages.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.backend import CommitWrite, Module, call_function, find_export
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.apply.redirects import assemble
from hotpatch.errors import (
    BusyError,
    IdentityMismatchError,
    PackageError,
    PackageUnsignedError,
    PackageUntrustedError,
    ProcessGoneError,
    RefusedError,
    SequenceError,
    SiteMismatchError,
    StepFailedError,
)
from hotpatch.package.format import content_sha256_of, dumps, loads, package_id_of, save
from hotpatch.package.model import (
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    ImportTarget,
    Metadata,
    Package,
    PatchSite,
    Strategy,
    TargetIdentity,
    UnwindEntry,
)
from hotpatch.pe.image import Image
from hotpatch.process.win32mem import MEM_FREE, PAGE_EXECUTE_READ, PAGE_READONLY, PAGE_READWRITE
from tests.fixtures.cases import Call, Case, load_cases
from tests.support.hosts import Host
from tests.support.live import BASELINE, CALLS, image_of, wait_values
from tests.support.packages import Code, export_rva, identity_of, package, simple, site
from tests.support.signing import SIGNING_KEY, signed

ROOT = Path(__file__).resolve().parent.parent
#: every value a call may return while the packages of this module come and go. 32 is a call
#: of stack_two's scale_then_xor that was already running when the rollback committed: it
#: calls scale after the commit and gets the baseline's (31 + 1). The commit guarantees that
#: no thread is inside the bytes it rewrites, not that no call straddles it (docs/APPLY.md).
ALLOWED = {"scale": {22, 33, 42}, "add": {5, 1005}, "scale_then_xor": {30, 49, 61, 32}}
CYCLES = int(os.environ.get("HOTPATCH_APPLY_CYCLES", "200"))
HOTPATCH_CASES = [case.name for case in load_cases(Path("unbuilt")) if case.verdict == "HOTPATCH"]


# --------------------------------------------------------------------------
# Building packages with the model
# --------------------------------------------------------------------------


def stack_one(dll: Path) -> Package:
    """Sequence 1: scale(x) = 5x - 2, add(a, b) = a + b + 1000."""
    return package(
        dll,
        {"scale": "lea rax, [rcx + rcx*4 - 2]\nret", "add": "lea rax, [rcx + rdx + 1000]\nret"},
        baseline_id="stack",
        sequence=1,
    )


def stack_two(dll: Path, sequence: int = 2) -> Package:
    """Sequence 2: scale(x) = 6x; scale_then_xor(a, b) = scale(a) + b; add back to the baseline's."""
    stx = """
        push rbx
        sub rsp, 0x20
        mov rbx, rdx
        call BASELINE:scale
        add rax, rbx
        add rsp, 0x20
        pop rbx
        ret
    """
    return package(
        dll,
        {"scale": "imul rax, rcx, 6\nret", "scale_then_xor": stx},
        baseline_id="stack",
        sequence=sequence,
    )


def unwind_info(prolog: int, codes: list[tuple[int, int, int]]) -> bytes:
    """UNWIND_INFO version 1 without handler; codes are (prolog offset, op, info), last first."""
    data = bytes([1, prolog, len(codes), 0]) + b"".join(bytes([o, op | info << 4]) for o, op, info in codes)
    return data + bytes(len(data) % 4)


UWOP_PUSH_NONVOL, UWOP_ALLOC_SMALL = 0, 2
RCX, RDX, RBX = 1, 2, 3
PARSE_TEXT = b"1234\0"


@dataclass(frozen=True)
class Rich:
    package: Package
    offsets: dict[str, int]  # function -> offset in the code blob
    rodata: dict[str, int]  # item -> offset in the rodata blob
    not_loaded_dll: str | None


def rich(dll: Path, not_loaded_dll: str | None) -> Rich:
    """scale through a baseline call and a DATA value, an import called through a RODATA slot,
    atoi from a DLL the process has not loaded (lstrlenA from kernel32 without one), a BSS
    counter, absolute and image-relative pointers, and unwind info for the functions with a frame."""
    CODE, RODATA, DATA, BSS = 0, 1, 2, 3
    rodata = bytearray()
    offsets = {}

    def put(name: str, data: bytes, align: int = 8) -> int:
        rodata.extend(bytes(-len(rodata) % align))
        offsets[name] = len(rodata)
        rodata.extend(data)
        return offsets[name]

    code = Code(CODE)
    # add(5x, [data]) = 5x - 2. The baseline's scale clobbers only rax, and GCC's -fipa-ra lets
    # scale_then_xor keep b in rdx across the call: the new scale must preserve rcx and rdx.
    code.label("scale")
    code.asm("push rbx")
    code.asm("push rdx")
    code.asm("push rcx")
    code.asm("sub rsp, 0x20")
    code.asm("lea rcx, [rcx + rcx*4]")
    code.asm("mov rdx, qword ptr [rip + FAR]", BlobTarget(DATA, 0))
    code.asm("call FAR", BaselineRVA(export_rva(dll, "add")))
    code.asm("add rsp, 0x20")
    code.asm("pop rcx")
    code.asm("pop rdx")
    code.asm("pop rbx")
    code.asm("ret")
    code.label("get_pid")
    code.asm("sub rsp, 0x28")
    code.asm("call qword ptr [rip + FAR]", BlobTarget(RODATA, 0))
    code.asm("add rsp, 0x28")
    code.asm("ret")
    code.label("parse")
    code.asm("sub rsp, 0x28")
    code.asm("lea rcx, [rip + FAR]", BlobTarget(RODATA, 8))
    parse = ImportTarget(not_loaded_dll, "atoi") if not_loaded_dll else ImportTarget("kernel32.dll", "lstrlenA")
    code.asm("call FAR", parse)
    code.asm("add rsp, 0x28")
    code.asm("ret")
    code.label("counter")
    code.asm("mov rax, qword ptr [rip + FAR]", BlobTarget(BSS, 0))
    code.asm("add rax, 1")
    code.asm("mov qword ptr [rip + FAR], rax", BlobTarget(BSS, 0))
    code.asm("ret")
    ends = {"scale": code.labels["get_pid"], "get_pid": code.labels["parse"], "parse": code.labels["counter"]}

    put("pid_slot", bytes(8))
    put("text", PARSE_TEXT)
    put("abs_scale", bytes(8))
    put("rel_scale", bytes(4), 4)
    scale_codes = [(7, UWOP_ALLOC_SMALL, 3), (3, UWOP_PUSH_NONVOL, RCX), (2, UWOP_PUSH_NONVOL, RDX),
                   (1, UWOP_PUSH_NONVOL, RBX)]
    put("unwind_scale", unwind_info(7, scale_codes), 4)
    put("unwind_frame", unwind_info(4, [(4, UWOP_ALLOC_SMALL, 4)]), 4)
    fixups = [
        *code.fixups,
        Fixup(RODATA, 0, FixupKind.ABS64, ImportTarget("KERNEL32.dll", "GetCurrentProcessId")),
        Fixup(RODATA, offsets["abs_scale"], FixupKind.ABS64, BlobTarget(CODE, 0)),
        Fixup(RODATA, offsets["rel_scale"], FixupKind.IMAGE_REL32, BlobTarget(CODE, 0)),
    ]
    unwind = (
        UnwindEntry(CODE, 0, ends["scale"], RODATA, offsets["unwind_scale"]),
        UnwindEntry(CODE, code.labels["get_pid"], ends["get_pid"], RODATA, offsets["unwind_frame"]),
        UnwindEntry(CODE, code.labels["parse"], ends["parse"], RODATA, offsets["unwind_frame"]),
    )
    pkg = Package(
        target=identity_of(dll),
        baseline_id="rich",
        sequence=1,
        blobs=(
            Blob(CODE, BlobKind.CODE, 16, bytes(code.data), len(code.data)),
            Blob(RODATA, BlobKind.RODATA, 8, bytes(rodata), len(rodata)),
            Blob(DATA, BlobKind.DATA, 8, struct.pack("<q", -2), 8),
            Blob(BSS, BlobKind.BSS, 8, b"", 8),
        ),
        fixups=tuple(fixups),
        sites=(site(dll, "scale", 0),),
        unwind=unwind,
    )
    return Rich(pkg, dict(code.labels), offsets, not_loaded_dll)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------



@pytest.fixture(scope="module")
def host(wine_prefix: Path, dll: Path) -> Iterator[Host]:
    running = Host(wine_prefix, dll, CALLS)
    yield running
    code, stderr = running.stop()
    assert code == 0, f"host.exe exited with {code}: {stderr}"
    for name, allowed in ALLOWED.items():
        seen = {v for values in running.observed(0, name) for v in values}
        assert seen <= allowed, f"{name} returned {sorted(seen - allowed)}"



@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def engine(target: AgentProcessBackend, state_dir: Path) -> Iterator[Engine]:
    made = Engine(target, Journal(state_dir))
    yield made
    assert not made.status().packages, "a test left a package applied"


def readonly_of(target: AgentProcessBackend, module: Module, dll: Path) -> list[bytes]:
    """The module's headers and non-writable sections (its own code may write its data meanwhile)."""
    sections = [s for s in Image.load(dll).sections if not s.writable and s.end_rva > s.rva]
    return [target.read(module.base_va, 0x1000)] + [
        target.read(module.base_va + s.rva, s.end_rva - s.rva) for s in sections
    ]


def apply(engine: Engine, pkg: Package, sign: bool = True, **kw: object):
    """Apply as a user does: the package signed by the vendor's key, which the trust store holds."""
    with engine.transaction() as tx:
        return tx.apply(signed(pkg) if sign else pkg, **kw)  # type: ignore[arg-type]


def rollback(engine: Engine, package_id: str | None = None):
    with engine.transaction() as tx:
        return tx.rollback(package_id)


def refused(engine: Engine, pkg: Package, cause: type[BaseException], **kw: object) -> StepFailedError:
    with pytest.raises(StepFailedError) as info:
        apply(engine, pkg, **kw)
    assert isinstance(info.value.cause, cause), info.value
    trust = issubclass(cause, PackageUnsignedError | PackageUntrustedError)
    assert info.value.undone and info.value.exit_code == (5 if trust else 1)
    return info.value


# --------------------------------------------------------------------------
# Apply and rollback
# --------------------------------------------------------------------------


def test_apply_switches_outputs_while_threads_run_and_rollback_restores(
    engine: Engine, host: Host, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    before = image_of(target, module)
    wait_values(host, BASELINE)
    result = apply(engine, simple(dll))
    assert result.status == "applied" and result.commit is not None
    assert result.commit.suspended and result.commit.attempts >= 1
    assert result.code_hash is not None and result.code_hash.state == "verified"
    (redirect,) = result.sites
    assert redirect.strategy is Strategy.REL32_JMP
    assert module.base_va < result.allocation_va < module.base_va + 0x80000000  # above the image, in reach
    wait_values(host, {"scale": 33, "scale_then_xor": 49, "add": 5})
    assert target.query(result.allocation_va).protect == PAGE_EXECUTE_READ

    (undone,) = rollback(engine)
    assert undone.commit is not None and undone.commit.suspended
    assert undone.released is True
    assert target.query(result.allocation_va).state == MEM_FREE
    wait_values(host, BASELINE)
    assert image_of(target, module) == before
    assert host.proc.poll() is None


def test_rich_package_resolves_every_fixup_kind_and_registers_unwind_info(
    engine: Engine, host: Host, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    not_loaded = "msvcr100.dll"
    assert not_loaded not in {m.name.lower() for m in target.modules()}
    made = rich(dll, not_loaded)
    before = image_of(target, module)
    result = apply(engine, made.package)
    base = result.allocation_va
    code_va = base  # the code blob is first
    try:
        wait_values(host, {"scale": 33})
        assert {i.name: i.loaded_by_us for i in result.imports} == {"atoi": True, "GetCurrentProcessId": False}
        assert not_loaded in {m.name.lower() for m in target.modules()}
        assert call_function(target, code_va + made.offsets["get_pid"]) == host.pid
        assert call_function(target, code_va + made.offsets["parse"]) == 1234
        assert [call_function(target, code_va + made.offsets["counter"]) for _ in range(2)] == [1, 2]

        parts = {p["name"]: p for p in engine.process_journal.record(result.serial).allocation.parts}
        rodata = result.blob_vas[1]  # the rodata blob (index 1), after the region's marker
        assert target.read(parts["rodata"]["va"], 16) == b"hotpatch.region\x01"
        assert struct.unpack("<Q", target.read(rodata + made.rodata["abs_scale"], 8))[0] == code_va
        assert struct.unpack("<I", target.read(rodata + made.rodata["rel_scale"], 4))[0] == code_va - module.base_va
        assert target.read(rodata + made.rodata["text"], len(PARSE_TEXT)) == PARSE_TEXT
        protections = {name: target.query(p["va"]).protect for name, p in parts.items()}
        assert protections == {"code": PAGE_EXECUTE_READ, "rodata": PAGE_READONLY, "data": PAGE_READWRITE}

        # The unwinder finds our RUNTIME_FUNCTIONs, relative to the allocation's base.
        lookup = find_export(target, _module(target, "ntdll.dll"), "RtlLookupFunctionEntry")
        slot = target.allocate_near(0, 0x1000, PAGE_READWRITE)
        try:
            for index, name in enumerate(("scale", "get_pid", "parse")):
                entry = call_function(target, lookup, code_va + made.offsets[name] + 1, slot, 0)
                assert entry == result.function_table_va + 12 * index, name
                assert struct.unpack("<Q", target.read(slot, 8))[0] == base
                begin, end, info = struct.unpack("<III", target.read(entry, 12))
                assert begin == made.offsets[name] and base + info in range(rodata, rodata + 0x1000)
        finally:
            target.free(slot)
    finally:
        (undone,) = rollback(engine)
    wait_values(host, BASELINE)
    assert image_of(target, module) == before
    if undone.released:
        assert target.query(base).state == MEM_FREE
        assert not_loaded not in {m.name.lower() for m in target.modules()}


def _module(target: AgentProcessBackend, name: str) -> Module:
    (found,) = [m for m in target.modules() if m.name.lower() == name]
    return found


def test_abs_jmp_strategy_redirects_too(engine: Engine, host: Host, target: AgentProcessBackend, dll: Path) -> None:
    pkg = simple(dll)
    abs_site = replace(pkg.sites[0], strategy=Strategy.ABS_JMP, fallbacks=())
    pkg = replace(pkg, sites=(abs_site,), baseline_id="abs")
    result = apply(engine, pkg)
    assert result.sites[0].strategy is Strategy.ABS_JMP
    va = result.module_base + abs_site.rva
    assert target.read(va, 14) == b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", result.allocation_va)
    wait_values(host, {"scale": 33})
    rollback(engine)
    wait_values(host, BASELINE)


def test_dry_run_checks_everything_and_changes_nothing(
    engine: Engine, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    before = image_of(target, module)
    result = apply(engine, rich(dll, "msvcr100.dll").package, dry_run=True)
    assert result.status == "dry-run" and result.allocation_size >= 0x3000
    assert {i.name: i.va != 0 for i in result.imports} == {"atoi": False, "GetCurrentProcessId": True}
    assert "msvcr100.dll" not in {m.name.lower() for m in target.modules()}
    assert image_of(target, module) == before
    assert not engine.process_journal.live()


# --------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------


def foreign_stub(target: AgentProcessBackend, near: int) -> int:
    stub = target.allocate_near(near, 0x1000, PAGE_READWRITE)
    target.write(stub, assemble("lea rax, [rcx + rcx*2 + 1]\nret"))  # the baseline's scale
    target.protect(stub, 0x1000, PAGE_EXECUTE_READ)
    return stub


def test_status_reports_ours_original_and_foreign(
    engine: Engine, host: Host, target: AgentProcessBackend, dll: Path
) -> None:
    pkg = stack_one(dll)
    result = apply(engine, pkg)
    (status,) = engine.status().packages
    assert status.package_id == package_id_of(pkg) and status.state == "ours"
    assert [s.state for s in status.sites] == ["ours", "ours"]

    # Someone else redirects scale elsewhere: foreign, and rollback refuses to touch it.
    scale_va = result.module_base + export_rva(dll, "scale")
    ours = target.read(scale_va, 5)
    stub = foreign_stub(target, scale_va)
    hook = b"\xe9" + struct.pack("<i", stub - (scale_va + 5))
    target.commit([CommitWrite(scale_va, ours, hook)])
    try:
        states = {s.function: s.state for s in engine.status().packages[0].sites}
        assert states == {"scale": "foreign", "add": "ours"}
        with pytest.raises(StepFailedError, match="foreign bytes at site scale") as info:
            rollback(engine)
        assert isinstance(info.value.cause, SiteMismatchError)
        assert target.read(scale_va, 5) == hook
    finally:
        target.commit([CommitWrite(scale_va, hook, ours)])
    wait_values(host, {"scale": 33})

    # Someone puts the original bytes back under our feet: original.
    add_va = result.module_base + export_rva(dll, "add")
    add_redirect = target.read(add_va, 5)
    (add_site,) = [s for s in pkg.sites if s.function == "add"]
    target.commit([CommitWrite(add_va, add_redirect, add_site.expected[:5])])
    try:
        states = {s.function: s.state for s in engine.status().packages[0].sites}
        assert states == {"scale": "ours", "add": "original"}
    finally:
        target.commit([CommitWrite(add_va, target.read(add_va, 5), add_redirect)])
    rollback(engine)
    wait_values(host, BASELINE)
    time.sleep(0.05)
    target.free(stub)


# --------------------------------------------------------------------------
# Refusals leave the module byte-for-byte unchanged
# --------------------------------------------------------------------------


def test_wrong_identity_is_refused(engine: Engine, target: AgentProcessBackend, module: Module, dll: Path) -> None:
    pkg = simple(dll)
    ident = pkg.target
    wrong = TargetIdentity(ident.module_name, ident.timedatestamp + 1, ident.size_of_image, ident.checksum,
                           ident.code_sha256)
    before = image_of(target, module)
    error = refused(engine, replace(pkg, target=wrong), IdentityMismatchError)
    assert error.step == "module" and "TimeDateStamp" in str(error) and "nothing was changed" in str(error)
    wrong_code = TargetIdentity(ident.module_name, ident.timedatestamp, ident.size_of_image, ident.checksum,
                                bytes(32))
    error = refused(engine, replace(pkg, target=wrong_code), IdentityMismatchError)
    assert error.step == "code hash"
    other = TargetIdentity("other.dll", ident.timedatestamp, ident.size_of_image, ident.checksum, ident.code_sha256)
    refused(engine, replace(pkg, target=other), RefusedError)
    assert image_of(target, module) == before
    assert not engine.process_journal.live()


def test_site_changed_by_someone_else_is_refused(
    engine: Engine, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    # The last byte of the 10-byte nop after scale's ret: never executed, but part of the site.
    va = module.base_va + export_rva(dll, "scale") + 15
    original = target.read(va, 1)
    target.commit([CommitWrite(va, original, b"\x01")])
    try:
        before = image_of(target, module)
        error = refused(engine, simple(dll), SiteMismatchError)
        assert error.step == "sites" and "foreign bytes at site scale" in str(error)
        assert image_of(target, module) == before
    finally:
        target.commit([CommitWrite(va, b"\x01", original)])


def test_trust_policy_admits_only_trusted_signers_and_unsigned_on_request(
    target: AgentProcessBackend, module: Module, host: Host, state_dir: Path, dll: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    strict = Engine(target, Journal(state_dir))  # the trust store: only the test key
    lenient = Engine(target, Journal(state_dir), allow_unsigned=True)
    stranger = Ed25519PrivateKey.generate()
    vendor = signed(simple(dll))
    code = vendor.blobs[0]
    tampered = replace(vendor, blobs=(replace(code, data=code.data.replace(b"\xfe", b"\xfd", 1)),),
                       signature=None, signer_public_key=None)
    assert content_sha256_of(tampered) != content_sha256_of(vendor)
    before = image_of(target, module)
    for engine, pkg, cause in (
        (strict, simple(dll), PackageUnsignedError),
        (strict, signed(simple(dll), stranger), PackageUntrustedError),
        (lenient, signed(simple(dll), stranger), PackageUntrustedError),  # never by an unknown key
        (lenient, signed(tampered, stranger), PackageUntrustedError),  # the vendor's, altered, re-signed
    ):
        error = refused(engine, pkg, cause, sign=False)
        assert error.step == "signature" and image_of(target, module) == before
    apply(lenient, simple(dll), sign=False)  # unsigned, on request
    wait_values(host, {"scale": 33})
    rollback(lenient)
    apply(strict, vendor, sign=False)  # signed by the trusted key
    wait_values(host, {"scale": 33})
    rollback(strict)
    wait_values(host, BASELINE)


def test_corrupt_package_is_refused_before_the_process_is_touched(dll: Path) -> None:
    data = bytearray(dumps(simple(dll)))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(PackageError):
        loads(bytes(data))


def test_pid_that_is_gone_is_refused(agent: AgentClient, wine_prefix: Path, dll: Path, state_dir: Path) -> None:
    short = Host(wine_prefix, dll, ["scale:1"], threads=1)
    backend = agent.open(short.pid)
    engine = Engine(backend, Journal(state_dir))
    assert short.stop()[0] == 0
    with pytest.raises(StepFailedError) as info:
        apply(engine, simple(dll))
    assert isinstance(info.value.cause, ProcessGoneError)
    backend.close()
    with pytest.raises(ProcessGoneError):
        agent.open(short.pid)


# --------------------------------------------------------------------------
# Stacking
# --------------------------------------------------------------------------


def test_stacking_replaces_the_older_package_in_one_commit(
    engine: Engine, host: Host, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    before = image_of(target, module)
    one = apply(engine, stack_one(dll))
    wait_values(host, {"scale": 33, "add": 1005, "scale_then_xor": 49})

    two = apply(engine, stack_two(dll))
    assert two.replaced == one.package_id and two.commit is not None and two.commit.suspended
    wait_values(host, {"scale": 42, "add": 5, "scale_then_xor": 61})
    assert [p.package_id for p in engine.status().packages] == [two.package_id]
    record = engine.process_journal.record(one.serial)
    assert record.phase == "replaced" and record.replaced_by == two.serial
    assert record.allocation.state in ("freed", "retained")
    commit = engine.process_journal.record(two.serial).commit
    assert commit is not None and commit.kind == "replace"
    assert {w.va - module.base_va for w in commit.writes} == {
        export_rva(dll, n) for n in ("scale", "add", "scale_then_xor")
    }

    error = refused(engine, stack_one(dll), SequenceError)
    assert "sequence 1" in str(error)
    refused(engine, replace(stack_two(dll), metadata=Metadata(description="same sequence")), SequenceError)

    rollback(engine)
    wait_values(host, BASELINE)
    assert image_of(target, module) == before


# --------------------------------------------------------------------------
# Busy
# --------------------------------------------------------------------------


def test_thread_parked_in_the_site_makes_commit_busy_and_nothing_changes(
    target: AgentProcessBackend, agent: AgentClient, module: Module, state_dir: Path, dll: Path
) -> None:
    # A spin loop in the padding after scale's ret: nop; nop; jmp $ (the thread parks at +2).
    park_rva = export_rva(dll, "scale") + 6
    park_va = module.base_va + park_rva
    original = target.read(park_va, 4)
    target.commit([CommitWrite(park_va, original, b"\x90\x90\xeb\xfe")])
    thread_id = target.remote_call(park_va, 0, wait=False)
    try:
        deadline = time.monotonic() + 10
        while not any(t.rip == park_va + 2 for t in target.thread_contexts().threads):
            assert time.monotonic() < deadline, "the thread never parked"
        code = Code(0)
        code.asm("ret")
        parked = PatchSite(park_rva, "park", target.read(park_va, 5), 0, 0, Strategy.REL32_JMP)
        pkg = Package(
            target=identity_of(dll, {park_rva: b"\x90\x90\xeb\xfe"}), baseline_id="park", sequence=1,
            blobs=(Blob(0, BlobKind.CODE, 16, bytes(code.data), len(code.data)),), sites=(parked,),
        )
        before = image_of(target, module)
        engine = Engine(target, Journal(state_dir), max_attempts=5, retry_sleep_ms=1)
        with pytest.raises(StepFailedError, match="busy") as info:
            apply(engine, pkg)
        assert info.value.step == "commit" and isinstance(info.value.cause, BusyError)
        assert info.value.cause.thread_id == thread_id and info.value.undone
        assert "everything done was undone" in str(info.value)
        assert image_of(target, module) == before
        (record,) = [r for r in engine.process_journal.records if r.package_id == package_id_of(pkg)][-1:]
        assert record.phase == "undone" and record.allocation.state == "freed"
        assert target.query(record.allocation.va).state == MEM_FREE
    finally:
        target.commit([CommitWrite(park_va + 2, b"\xeb", b"\xc3", no_suspend=True)])  # jmp $ -> ret
        deadline = time.monotonic() + 10
        while thread_id in agent.threads(target.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        target.commit([CommitWrite(park_va, b"\x90\x90\xc3\xfe", original)])


# --------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------

APPLIER = """
import os, sys
from hotpatch.apply.agent import AgentClient
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.package.format import load

pid, package, state, prefix, crash_at = sys.argv[1:]
client = AgentClient.start(prefix=prefix)
backend = client.open(int(pid))

def on_step(step):
    if step == crash_at:
        os._exit(17)  # as if killed: no undo, no journal update, no goodbye to the agent

engine = Engine(backend, Journal(state), on_step=on_step)  # trust store: $HOTPATCH_TRUST_DIR
with engine.transaction() as tx:
    tx.apply(load(package))
"""


def crash_applier(tmp_path: Path, host: Host, pkg: Package, state_dir: Path, prefix: Path, crash_at: str) -> None:
    path = tmp_path / "package.hpk"
    save(pkg, path, sign_key=SIGNING_KEY)
    proc = subprocess.run(
        [sys.executable, "-c", APPLIER, str(host.pid), str(path), str(state_dir), str(prefix), crash_at],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr


def test_recover_undoes_an_apply_killed_before_its_commit(
    tmp_path: Path, host: Host, target: AgentProcessBackend, module: Module, state_dir: Path, wine_prefix: Path,
    dll: Path,
) -> None:
    pkg = rich(dll, None).package
    before = image_of(target, module)
    crash_applier(tmp_path, host, pkg, state_dir, wine_prefix, "commit")
    engine = Engine(target, Journal(state_dir))
    (record,) = engine.process_journal.live()
    assert record.phase == "applying" and record.allocation.state == "allocated"
    assert record.function_table is not None and record.function_table.state == "registered"
    assert target.query(record.allocation.va).state != MEM_FREE

    report = engine.recover()
    assert report.consistent
    (action,) = [a for a in report.actions if a["serial"] == record.serial]
    assert (action["outcome"], action["after"], action["allocation"]) == ("undone", "undone", "freed")
    assert target.query(record.allocation.va).state == MEM_FREE
    assert image_of(target, module) == before
    assert not engine.status().packages


def test_recover_completes_an_apply_killed_after_its_commit(
    tmp_path: Path, host: Host, target: AgentProcessBackend, state_dir: Path, wine_prefix: Path, dll: Path
) -> None:
    crash_applier(tmp_path, host, simple(dll), state_dir, wine_prefix, "apply:sent")
    wait_values(host, {"scale": 33})
    engine = Engine(target, Journal(state_dir))
    (record,) = engine.process_journal.live()
    assert record.phase == "applying" and record.commit is not None and record.commit.state == "pending"

    report = engine.recover()
    (action,) = [a for a in report.actions if a["serial"] == record.serial]
    assert (action["outcome"], action["after"]) == ("completed", "applied")
    (status,) = engine.status().packages
    assert status.state == "ours"
    assert engine.recover().actions[-1]["outcome"] == "verified"
    rollback(engine)
    wait_values(host, BASELINE)


# --------------------------------------------------------------------------
# The journal is never the only authority; a target that exits
# --------------------------------------------------------------------------


def test_rollback_and_recover_refuse_an_edited_or_forged_journal(
    engine: Engine, host: Host, target: AgentProcessBackend, module: Module, dll: Path
) -> None:
    import json

    result = apply(engine, simple(dll))
    wait_values(host, {"scale": 33})
    path = engine.process_journal.path
    genuine = path.read_text()
    applied = image_of(target, module)
    add_va = module.base_va + export_rva(dll, "add")
    add_bytes = target.read(add_va, 8)

    def forge(change) -> None:  # noqa: ANN001 - edits the journal document in place
        document = json.loads(genuine)
        change(document["records"][-1], document)
        path.write_text(json.dumps(document))

    def int3_to_restore(record: dict, _: dict) -> None:  # rollback would write cc cc into scale's entry
        patch = record["sites"][0]["patches"][0]
        patch["original"] = "cc" * (len(patch["original"]) // 2)

    def eight_bytes_into_add(record: dict, _: dict) -> None:  # "our redirect" is what add holds now
        record["sites"].append({"rva": export_rva(dll, "add"), "function": "add", "strategy": "ABS_JMP",
                                "target_va": 0, "patches": [{"va": add_va, "role": "entry",
                                                             "original": "48c7c00d000000c3",
                                                             "redirect": add_bytes.hex(), "atomic": False}]})

    for change in (int3_to_restore, eight_bytes_into_add):
        forge(change)
        with pytest.raises(StepFailedError) as info:
            rollback(engine)
        assert info.value.step == "provenance" and "nothing was changed" in str(info.value), info.value
        assert info.value.exit_code == 1 and image_of(target, module) == applied

    # A "retained" allocation of ours that is in fact some region of the process: never freed.
    decoy = target.allocate_near(0, result.allocation_size, PAGE_READWRITE)
    try:
        def retained_decoy(record: dict, document: dict) -> None:
            fake = json.loads(json.dumps(record))
            fake.update(serial=document["next_serial"], phase="rolled_back", function_table=None, commit=None)
            fake["allocation"].update(va=decoy, state="retained")
            document["records"].append(fake)
            document["next_serial"] += 1

        forge(retained_decoy)
        report = engine.recover()
        outcomes = {a["serial"]: (a["outcome"], a["note"]) for a in report.actions}
        outcome, note = outcomes[max(outcomes)]
        assert outcome == "inconsistent" and "marker" in note and not report.consistent
        assert not target.query(decoy).is_free
    finally:
        target.free(decoy)
    path.write_text(genuine)
    rollback(engine)
    wait_values(host, BASELINE)


def test_a_target_that_exits_during_the_commit_is_reported_as_exited(
    agent: AgentClient, wine_prefix: Path, dll: Path, state_dir: Path
) -> None:
    short = Host(wine_prefix, dll, ["scale:1"], threads=1)

    def exit_now(step: str) -> None:
        if step == "commit":
            short.proc.kill()
            short.proc.wait()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until Wine has noticed
                try:
                    agent.process_info(short.pid)
                except ProcessGoneError:
                    return
                time.sleep(0.05)

    try:
        with agent.open(short.pid) as backend:
            engine = Engine(backend, Journal(state_dir), on_step=exit_now)
            with pytest.raises(StepFailedError) as info:
                apply(engine, simple(dll))
    finally:
        short.stop()
    error = info.value
    assert isinstance(error.cause, ProcessGoneError) and error.undone and error.exit_code == 1, error
    assert f"process {short.pid} exited" in str(error) and "recover" not in str(error)
    assert not engine.process_journal.path.exists()


# --------------------------------------------------------------------------
# Cycles under load
# --------------------------------------------------------------------------


def test_apply_rollback_cycles_under_load(
    engine: Engine, host: Host, target: AgentProcessBackend, module: Module, dll: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = image_of(target, module)
    pkg = simple(dll)
    start = host.mark()
    pauses, floors, retained = [], [], 0
    began = time.perf_counter()
    for _ in range(CYCLES):
        result = apply(engine, pkg)
        assert result.commit is not None
        pauses.append(result.commit.pause_us)
        (undone,) = rollback(engine)
        assert undone.commit is not None
        pauses.append(undone.commit.pause_us)
        retained += undone.released is False
    elapsed = time.perf_counter() - began
    for _ in range(10):
        floors.append(target.suspend_resume_floor().pause_us)
    wait_values(host, BASELINE)
    assert host.proc.poll() is None
    seen = {name: {v for values in host.observed(start, name) for v in values} for name in BASELINE}
    assert seen == {"scale": {22, 33}, "add": {5}, "scale_then_xor": {30, 49}}
    assert image_of(target, module) == before
    live = [r for r in engine.process_journal.records if r.allocation and r.allocation.state != "freed"]
    assert all(r.allocation.state == "retained" for r in live)
    pauses.sort()
    floors.sort()
    with capsys.disabled():
        print(
            f"\n{CYCLES} apply/rollback cycles in {elapsed:.1f} s ({1000 * elapsed / CYCLES:.0f} ms per cycle), "
            f"code retained {retained} times; commit pause (us) median {pauses[len(pauses) // 2]:.0f} "
            f"p90 {pauses[len(pauses) * 9 // 10]:.0f} max {pauses[-1]:.0f}; floor median {floors[len(floors) // 2]:.0f}"
        )


# --------------------------------------------------------------------------
# The padding strategy
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padding_dll(built_fixtures: Path) -> Path:
    return built_fixtures.resolve() / "padding_entry" / "baseline.dll"


def test_padding_strategy_commits_without_suspending(
    agent: AgentClient, wine_prefix: Path, padding_dll: Path, state_dir: Path
) -> None:
    pad = Host(wine_prefix, padding_dll, ["scale:7", "zero_flag"])
    try:
        sites = []
        for name in ("scale", "zero_flag"):
            rva = export_rva(padding_dll, name)
            image = Image.load(padding_dll)
            sites.append(PatchSite(
                rva, name, image.read(rva, 2), 0, 0, Strategy.SHORT_JMP_PADDING,
                padding_rva=rva - 6, padding_expected=image.read(rva - 6, 6),
            ))
        code = Code(0)
        code.label("scale")
        code.asm("lea rax, [rcx*8 + 2]")
        code.asm("sub rax, rcx")
        code.asm("ret")
        code.label("zero_flag")
        code.asm("mov eax, 2")
        code.asm("ret")
        sites = [replace(s, target_offset=code.labels[s.function]) for s in sites]
        pkg = Package(
            target=identity_of(padding_dll), baseline_id="padding", sequence=1,
            blobs=(Blob(0, BlobKind.CODE, 16, bytes(code.data), len(code.data)),), sites=tuple(sites),
        )
        with agent.open(pad.pid) as backend:
            engine = Engine(backend, Journal(state_dir))
            mod = _module(backend, padding_dll.name)
            before = image_of(backend, mod)
            wait_values(pad, {"scale": 22, "zero_flag": 0})
            result = apply(engine, pkg)
            assert [s.strategy for s in result.sites] == [Strategy.SHORT_JMP_PADDING] * 2
            assert result.commit is not None
            assert (result.commit.suspended, result.commit.pause_us) == (False, 0)
            wait_values(pad, {"scale": 51, "zero_flag": 2})
            (undone,) = rollback(engine)
            wait_values(pad, {"scale": 22, "zero_flag": 0})
            assert image_of(backend, mod) == before
            assert not engine.status().packages
        for name, allowed in (("scale", {22, 51}), ("zero_flag", {0, 2})):
            assert {v for values in pad.observed(0, name) for v in values} <= allowed
    finally:
        code_, stderr = pad.stop()
    assert code_ == 0, stderr


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def test_cli_apply_status_ps_rollback_with_exit_codes_and_json(
    tmp_path: Path, host: Host, agent: AgentClient, target: AgentProcessBackend, module: Module, state_dir: Path,
    wine_prefix: Path, agent_exe: Path, dll: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from hotpatch.apply import cli
    from hotpatch.package.signing import generate_keypair, load_private_key

    monkeypatch.setenv("HOTPATCH_STATE", str(state_dir))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))

    def run(*argv: str) -> tuple[int, dict | None, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out.strip() and "--json" in argv else None), err

    pid = str(host.pid)
    unsigned = tmp_path / "unsigned.hpk"
    save(simple(dll), unsigned)
    before = image_of(target, module)

    code, doc, err = run("apply", str(unsigned), "--pid", pid, "--json")
    assert code == 5 and "unsigned" in err and doc is not None and doc["results"] == []
    corrupt = tmp_path / "corrupt.hpk"
    corrupt.write_bytes(unsigned.read_bytes()[:-7])
    for bad in (corrupt, tmp_path / "missing.hpk"):
        code, doc, err = run("apply", str(bad), "--pid", pid, "--allow-unsigned", "--json")
        assert (code, doc) == (2, None) and err.startswith("hotpatch: error:") and err.count("\n") == 1
    gone = next(p for p in range(0x7FF0, 0x10000, 4) if p not in {e.pid for e in agent.list_processes()})
    code, doc, err = run("apply", str(unsigned), "--pid", str(gone), "--allow-unsigned", "--json")
    assert code == 1 and doc is not None and doc["results"][0]["kind"] == "ProcessGoneError"
    with pytest.raises(SystemExit) as exit_info:
        run("apply", str(unsigned))  # neither --pid nor --all
    assert exit_info.value.code == 2
    capsys.readouterr()

    code, doc, _ = run("apply", str(unsigned), "--pid", pid, "--allow-unsigned", "--dry-run", "--json")
    assert code == 0 and doc is not None and doc["results"][0]["status"] == "dry-run"
    assert image_of(target, module) == before

    code, doc, _ = run("apply", str(unsigned), "--all", "--allow-unsigned", "--json")
    assert code == 0 and doc is not None
    (applied,) = [r for r in doc["results"] if r["pid"] == host.pid]
    assert applied["status"] == "applied" and applied["sites"][0]["function"] == "scale"
    assert applied["commit"]["suspended"] is True
    wait_values(host, {"scale": 33})

    code, doc, _ = run("status", "--pid", pid, "--json")
    assert code == 0 and doc is not None
    (package_status,) = doc["processes"][0]["packages"]
    assert package_status["state"] == "ours" and package_status["package_id"] == package_id_of(simple(dll))
    code, doc, _ = run("status", "--all", "--json")
    assert code == 0 and doc is not None and host.pid in {p["pid"] for p in doc["processes"]}

    code, doc, _ = run("ps", "--module", dll.name, "--json")
    assert code == 0 and doc is not None
    (process,) = [p for p in doc["processes"] if p["pid"] == host.pid]
    (row,) = process["modules"]
    assert (row["base"], row["size_of_image"]) == (module.base_va, Image.load(dll).identity.size_of_image)
    assert [p["state"] for p in process["packages"]] == ["ours"]

    code, doc, _ = run("rollback", "--pid", pid, "--json")
    assert code == 0 and doc is not None and doc["results"][0]["status"] == "rolled_back"
    wait_values(host, BASELINE)
    code, doc, err = run("rollback", "--pid", pid, "--json")
    assert code == 1 and "no package is applied" in err
    code, doc, _ = run("recover", "--pid", pid, "--json")
    assert code == 0 and doc is not None and doc["consistent"]
    assert cli.main(["status", "--pid", pid]) == 0
    assert capsys.readouterr().out == f"pid {pid}: 0 package(s)\n"

    # Signatures: only trusted keys' packages go in (the store's, or one --trust adds for the call).
    pem, public = generate_keypair()
    key_file = tmp_path / "release.key"
    key_file.write_bytes(pem)
    signed_file = tmp_path / "signed.hpk"
    save(simple(dll), signed_file, sign_key=load_private_key(key_file))
    _, other = generate_keypair()
    for extra in (["--trust", other], ["--allow-unsigned"]):
        code, doc, err = run("apply", str(signed_file), "--pid", pid, *extra, "--json")
        assert code == 5 and "not trusted" in err and image_of(target, module) == before
    code, doc, _ = run("apply", str(signed_file), "--pid", pid, "--trust", public, "--json")
    assert code == 0 and doc is not None and doc["package"]["signature"] == "valid"
    wait_values(host, {"scale": 33})
    assert run("rollback", "--pid", pid)[0] == 0
    wait_values(host, BASELINE)
    store_signed = tmp_path / "store-signed.hpk"
    save(simple(dll), store_signed, sign_key=SIGNING_KEY)
    code, doc, _ = run("apply", str(store_signed), "--pid", pid, "--json")
    assert code == 0 and doc is not None
    assert run("rollback", "--pid", pid)[0] == 0
    wait_values(host, BASELINE)
    assert image_of(target, module) == before


# --------------------------------------------------------------------------
# Packages made by the builder, for every HOTPATCH fixture case
# --------------------------------------------------------------------------


def wait_calls(host: Host, calls: tuple[Call, ...], variant: str, timeout: float = 30) -> None:
    """Until one observation interval saw every call return only its ``variant`` value.

    host.exe prints one "observed" line per call per interval, in call order, from its first
    interval on, so the k-th such line belongs to call k mod len(calls).
    """
    deadline = time.monotonic() + timeout
    wanted = [(c.function, (getattr(c, variant),)) for c in calls]
    while True:
        with host._changed:
            observed = [line.split()[1:] for line in host.lines if line.startswith("observed ")]
        start = (len(observed) // len(calls) - 1) * len(calls)  # the newest complete interval
        window = observed[start : start + len(calls)] if start >= 0 else []
        if [(w[0], tuple(int(v) for v in w[1:] if v != "...")) for w in window] == wanted:
            return
        assert time.monotonic() < deadline, f"host never saw only the {variant} values: {window}"
        time.sleep(0.05)


@pytest.mark.parametrize("name", HOTPATCH_CASES)
def test_builder_package_goes_in_and_out_of_the_running_host(
    name: str, cases: list[Case], agent: AgentClient, wine_prefix: Path, state_dir: Path
) -> None:
    from hotpatch.diff.compare import diff
    from hotpatch.package.builder import build_package

    (case,) = [c for c in cases if c.name == name]
    pkg = build_package(diff(case.baseline, case.patched))
    running = Host(wine_prefix, case.baseline, [c.spec() for c in case.calls])
    try:
        with agent.open(running.pid) as backend:
            engine = Engine(backend, Journal(state_dir))
            mod = _module(backend, case.baseline.name)
            before = readonly_of(backend, mod, case.baseline)
            wait_calls(running, case.calls, "baseline")
            result = apply(engine, pkg)
            assert result.code_hash is not None and result.code_hash.state == "verified"
            wait_calls(running, case.calls, "patched")
            if pkg.sites:
                assert engine.status().packages[0].state == "ours"
            rollback(engine)
            wait_calls(running, case.calls, "baseline")
            assert readonly_of(backend, mod, case.baseline) == before
            assert not engine.status().packages
    finally:
        code, stderr = running.stop()
    assert code == 0, f"host.exe exited with {code}: {stderr}"


def test_package_applies_to_a_dll_loaded_away_from_its_preferred_base(
    cases: list[Case], agent: AgentClient, wine_prefix: Path, state_dir: Path
) -> None:
    """The preferred base is taken (host --reserve), so the loader relocates the DLL and every fixup
    of the package must follow the runtime base."""
    from hotpatch.diff.compare import diff
    from hotpatch.package.builder import build_package

    (case,) = [c for c in cases if c.name == "aslr_reloc"]
    preferred = Image.load(case.baseline).image_base
    pkg = build_package(diff(case.baseline, case.patched))
    assert any(f.kind.name == "ABS64" for f in pkg.fixups), "the case must carry absolute addresses"
    running = Host(wine_prefix, case.baseline, [c.spec() for c in case.calls], extra=("--reserve", hex(preferred)))
    try:
        assert running.base != preferred
        with agent.open(running.pid) as backend:
            engine = Engine(backend, Journal(state_dir))
            wait_calls(running, case.calls, "baseline")
            result = apply(engine, pkg)
            assert result.module_base == running.base
            wait_calls(running, case.calls, "patched")
            rollback(engine)
            wait_calls(running, case.calls, "baseline")
    finally:
        code, stderr = running.stop()
    assert code == 0, f"host.exe exited with {code}: {stderr}"
