"""hotpatch-agent.exe under Wine, against a running multi-threaded host.

host.exe runs body_change/baseline.dll with 8 threads calling ``scale(7)``
(22) in a loop for the whole module; the tests read and change its memory
through the agent, redirect ``scale`` to a stub and back while the threads
run, and check that the host saw only the two values and never crashed.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.backend import REL32_REACH, CommitWrite, Module, call_function, call_stub, find_export
from hotpatch.apply.protocol import HEADER, MAX_PAYLOAD, Opcode, Status, encode_frame
from hotpatch.errors import (
    AgentProtocolError,
    BackendError,
    BusyError,
    BytesMismatchError,
    ProcessGoneError,
    Win32Error,
)
from hotpatch.pe.image import Image
from hotpatch.process.win32mem import (
    MEM_COMMIT,
    MEM_FREE,
    MEM_IMAGE,
    MEM_PRIVATE,
    PAGE_EXECUTE_READ,
    PAGE_READONLY,
    PAGE_READWRITE,
)
from hotpatch.x86 import assemble
from tests.support.agents import LiveAgent, agent_build
from tests.support.hosts import THREADS, Host

BASELINE = 22  # scale(7) = 7 * 3 + 1
STUB_VALUE = 4242


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(wine_prefix: Path, dll: Path) -> Iterator[Host]:
    running = Host(wine_prefix, dll, ["scale:7"])
    yield running
    code, stderr = running.stop()
    assert code == 0, f"host.exe exited with {code}: {stderr}"
    assert any(line.startswith("done ") for line in running.lines), running.lines[-5:]
    assert all(values == (BASELINE,) or set(values) <= {BASELINE, STUB_VALUE} for values in running.observed(0))


@pytest.fixture
def scale_va(target: AgentProcessBackend, module: Module) -> int:
    return find_export(target, module, "scale")


# --------------------------------------------------------------------------
# Build (first: before the host's spinning threads compete with the compiler)
# --------------------------------------------------------------------------


def test_agent_builds_with_tracing_compiled_in(tmp_path: Path) -> None:
    exe = agent_build().build_agent(tmp_path, trace=True)
    assert exe.read_bytes()[:2] == b"MZ"


# --------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------


def test_hello_describes_the_agent(agent: AgentClient) -> None:
    hello = agent.hello
    assert (hello.protocol_version, hello.pointer_size, hello.max_frame) == (1, 8, 64 * 1024 * 1024)
    assert hello.agent_version
    assert hello.agent_pid > 0


def test_list_processes_contains_the_host(agent: AgentClient, host: Host) -> None:
    entries = {entry.pid: entry for entry in agent.list_processes()}
    assert entries[host.pid].name.lower() == "host.exe"
    assert entries[host.pid].threads >= THREADS + 1
    assert agent.hello.agent_pid in entries


def test_list_modules_finds_the_dll_at_the_base_the_host_printed(module: Module, host: Host, dll: Path) -> None:
    assert module.base_va == host.base
    assert module.size == Image.load(dll).identity.size_of_image
    assert module.path.lower().endswith("baseline.dll")


def test_read_returns_the_mapped_image(target: AgentProcessBackend, module: Module, dll: Path) -> None:
    image = Image.load(dll)
    headers = target.read(module.base_va, 0x200)
    assert headers[:2] == b"MZ"
    assert headers == dll.read_bytes()[:0x200]
    for export in image.exports:
        assert target.read(module.base_va + export.rva, 16) == image.read(export.rva, 16), export.name


def test_find_export_reads_the_export_directory_in_the_target(
    target: AgentProcessBackend, module: Module, scale_va: int, dll: Path
) -> None:
    (scale,) = [e for e in Image.load(dll).exports if e.name == "scale"]
    assert scale_va == module.base_va + scale.rva


def test_query_describes_the_image_code(target: AgentProcessBackend, scale_va: int, module: Module) -> None:
    region = target.query(scale_va)
    assert region.type == MEM_IMAGE and region.state == MEM_COMMIT
    assert region.protect == PAGE_EXECUTE_READ
    assert region.allocation_base_va == module.base_va
    assert region.base_va <= scale_va < region.base_va + region.size


def test_threads_lists_every_thread(agent: AgentClient, host: Host) -> None:
    assert len(agent.threads(host.pid)) >= THREADS + 1


def test_process_start_time_is_stable(target: AgentProcessBackend) -> None:
    assert target.process_start_time() == target.start_time > 0


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def test_allocate_near_is_within_rel32_reach(target: AgentProcessBackend, module: Module) -> None:
    size = 0x3000
    va = target.allocate_near(module.base_va, size, PAGE_READWRITE)
    try:
        assert va % 0x10000 == 0
        assert abs(va - module.base_va) <= REL32_REACH and abs(va + size - module.base_va) <= REL32_REACH
        assert abs(va + size - (module.base_va + module.size)) < 1 << 31
        region = target.query(va)
        assert (region.base_va, region.state, region.protect, region.type) == (
            va,
            MEM_COMMIT,
            PAGE_READWRITE,
            MEM_PRIVATE,
        )
        assert region.size >= size
    finally:
        target.free(va)
    assert target.query(va).state == MEM_FREE


def test_allocate_near_refuses_what_cannot_fit(target: AgentProcessBackend, module: Module) -> None:
    with pytest.raises(BackendError, match="NO_SPACE"):
        target.allocate_near(module.base_va, 0x20000, PAGE_READWRITE, reach=0x10000)


def test_write_read_protect_round_trip(target: AgentProcessBackend, module: Module) -> None:
    va = target.allocate_near(module.base_va, 0x2000, PAGE_READWRITE)
    try:
        data = bytes(range(256)) * 20  # crosses the page boundary
        target.write(va + 0x100, data)
        assert target.read(va + 0x100, len(data)) == data
        assert target.protect(va, 0x2000, PAGE_READONLY) == PAGE_READWRITE
        assert target.query(va).protect == PAGE_READONLY
        # WRITE goes through the protection and puts it back.
        target.write(va + 0xFF0, b"\xaa" * 32)
        assert target.read(va + 0xFF0, 32) == b"\xaa" * 32
        assert target.query(va).protect == PAGE_READONLY
        assert target.query(va + 0x1000).protect == PAGE_READONLY
        target.flush(va, 0x2000)
    finally:
        target.free(va)


def test_write_across_pages_restores_each_page_protection(target: AgentProcessBackend, module: Module) -> None:
    va = target.allocate_near(module.base_va, 0x4000, PAGE_READWRITE)
    try:
        target.protect(va + 0x1000, 0x1000, PAGE_READONLY)
        target.protect(va + 0x2000, 0x1000, PAGE_EXECUTE_READ)
        data = bytes(i * 7 & 0xFF for i in range(0x3000))
        target.write(va + 0x800, data)
        assert target.read(va + 0x800, len(data)) == data
        protections = [target.query(va + page * 0x1000).protect for page in range(4)]
        assert protections == [PAGE_READWRITE, PAGE_READONLY, PAGE_EXECUTE_READ, PAGE_READWRITE]
    finally:
        target.free(va)


def test_read_of_unmapped_memory_names_the_call(target: AgentProcessBackend, module: Module) -> None:
    va = target.allocate_near(module.base_va, 0x1000, PAGE_READWRITE)
    target.free(va)  # a user address with nothing mapped
    with pytest.raises(Win32Error, match="ReadProcessMemory") as info:
        target.read(va, 16)
    assert info.value.call == "ReadProcessMemory" and info.value.code != 0


# --------------------------------------------------------------------------
# Remote calls
# --------------------------------------------------------------------------


def kernel32(target: AgentProcessBackend) -> Module:
    (found,) = [m for m in target.modules() if m.name.lower() == "kernel32.dll"]
    return found


def ntdll(target: AgentProcessBackend) -> Module:
    (found,) = [m for m in target.modules() if m.name.lower() == "ntdll.dll"]
    return found


def test_remote_call_returns_the_thread_exit_code(target: AgentProcessBackend, module: Module) -> None:
    va = target.allocate_near(module.base_va, 0x1000, PAGE_READWRITE)
    try:
        target.write(va, assemble("lea eax, [rcx + 40]; ret"))
        target.protect(va, 0x1000, PAGE_EXECUTE_READ)
        assert target.remote_call(va, 2) == 42
    finally:
        target.free(va)


def test_call_function_passes_four_arguments_and_a_64_bit_result(target: AgentProcessBackend, host: Host) -> None:
    get_pid = find_export(target, kernel32(target), "GetCurrentProcessId")
    assert call_function(target, get_pid) == host.pid
    va = target.allocate_near(0, 0x1000, PAGE_READWRITE)
    try:
        target.write(va, assemble("lea rax, [rcx + rdx]; add rax, r8; add rax, r9; ret"))
        target.protect(va, 0x1000, PAGE_EXECUTE_READ)
        assert call_function(target, va, 1 << 40, 2, 3, 4) == (1 << 40) + 9
    finally:
        target.free(va)


def test_call_stub_bytes_are_pinned() -> None:
    assert call_stub().hex() == ("534883ec204889cb488b4b08488b53104c8b43184c8b4b20ff13488943284883c4205bc3")


def test_rtl_add_function_table_registers_unwind_info(target: AgentProcessBackend, module: Module) -> None:
    """What the apply step does for new code: RtlAddFunctionTable called in the target."""
    nt = ntdll(target)
    add = find_export(target, nt, "RtlAddFunctionTable")
    delete = find_export(target, nt, "RtlDeleteFunctionTable")
    lookup = find_export(target, nt, "RtlLookupFunctionEntry")
    base = target.allocate_near(module.base_va, 0x2000, PAGE_READWRITE)
    try:
        code, table, unwind, image_base_slot = base, base + 0x1000, base + 0x1010, base + 0x1100
        target.write(code, assemble("mov eax, 42; ret"))
        target.protect(code, 0x1000, PAGE_EXECUTE_READ)
        target.write(table, struct.pack("<III", 0, 6, unwind - base))
        target.write(unwind, bytes([1, 0, 0, 0]))  # version 1, no prolog, no codes
        assert call_function(target, lookup, code + 1, image_base_slot, 0) == 0
        assert call_function(target, add, table, 1, base) & 0xFF == 1
        assert call_function(target, lookup, code + 1, image_base_slot, 0) == table
        assert struct.unpack("<Q", target.read(image_base_slot, 8))[0] == base
        assert call_function(target, delete, table) & 0xFF == 1
        assert call_function(target, lookup, code + 1, image_base_slot, 0) == 0
    finally:
        target.free(base)


# --------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------


def redirect_stub(target: AgentProcessBackend, scale_va: int) -> tuple[int, bytes]:
    """An executable stub near scale returning STUB_VALUE, and the jmp rel32 to it."""
    stub = target.allocate_near(scale_va, 0x1000, PAGE_READWRITE)
    target.write(stub, assemble(f"mov eax, {STUB_VALUE}; ret"))
    target.protect(stub, 0x1000, PAGE_EXECUTE_READ)
    rel = stub - (scale_va + 5)
    assert -(1 << 31) <= rel < 1 << 31
    return stub, b"\xe9" + struct.pack("<i", rel)


def free_when_unused(target: AgentProcessBackend, va: int, size: int) -> None:
    """Free code only once no thread runs it or will return into it."""
    for _ in range(100):
        snapshot = target.thread_contexts(va, size)
        if not any(va <= t.rip < va + size or t.stack_hits for t in snapshot.threads):
            target.free(va)
            return
        time.sleep(0.01)
    raise AssertionError("a thread stayed in the stub")


def test_commit_redirects_scale_while_threads_run_and_back(
    target: AgentProcessBackend, host: Host, scale_va: int, capsys: pytest.CaptureFixture[str]
) -> None:
    original = target.read(scale_va, 5)
    stub, jump = redirect_stub(target, scale_va)
    pauses = []
    try:
        start = host.mark()
        host.wait_for_only(BASELINE, start)
        for _ in range(10):
            mark = host.mark()
            report = target.commit([CommitWrite(scale_va, original, jump)])
            assert report.suspended and report.attempts >= 1 and report.threads >= THREADS + 1
            assert target.read(scale_va, 5) == jump
            host.wait_for_only(STUB_VALUE, mark)
            pauses.append(report.pause_us)

            mark = host.mark()
            report = target.commit([CommitWrite(scale_va, jump, original)])
            assert target.read(scale_va, 5) == original
            host.wait_for_only(BASELINE, mark)
            pauses.append(report.pause_us)
        assert target.query(scale_va).protect == PAGE_EXECUTE_READ
        seen = host.observed(start)
        assert all(set(values) <= {BASELINE, STUB_VALUE} for values in seen), seen
        assert host.proc.poll() is None
    finally:
        if target.read(scale_va, 5) != original:
            target.commit([CommitWrite(scale_va, jump, original)])
        free_when_unused(target, stub, 0x1000)
    with capsys.disabled():
        pauses.sort()
        print(f"\ncommit pause (us), {len(pauses)} commits: min {pauses[0]:.0f} median {pauses[len(pauses) // 2]:.0f}")


def test_commit_with_wrong_expected_bytes_changes_nothing(target: AgentProcessBackend, scale_va: int) -> None:
    before = target.read(scale_va, 16)
    wrong = bytes(b ^ 0xFF for b in before[:5])
    with pytest.raises(BytesMismatchError) as info:
        target.commit(
            [
                CommitWrite(scale_va + 8, before[8:10], b"\xcc\xcc"),
                CommitWrite(scale_va, wrong, b"\x90" * 5),
            ]
        )
    assert info.value.va == scale_va and info.value.found == before[:5]
    assert target.read(scale_va, 16) == before


def test_commit_of_atomic_writes_does_not_suspend(target: AgentProcessBackend, module: Module) -> None:
    va = target.allocate_near(module.base_va, 0x1000, PAGE_READWRITE)
    try:
        target.write(va, b"\xcc" * 16)
        report = target.commit(
            [
                CommitWrite(va + 2, b"\xcc" * 5, b"\xe9\x00\x00\x00\x00", no_suspend=True),
                CommitWrite(va + 8, b"\xcc\xcc", b"\xeb\xf6", no_suspend=True),
            ]
        )
        assert (report.suspended, report.pause_us, report.threads) == (False, 0, 0)
        assert target.read(va, 16) == b"\xcc\xcc\xe9\x00\x00\x00\x00\xcc\xeb\xf6" + b"\xcc" * 6
    finally:
        target.free(va)


def test_commit_is_busy_while_a_thread_spins_inside_the_bytes(target: AgentProcessBackend, agent: AgentClient) -> None:
    va = target.allocate_near(0, 0x1000, PAGE_READWRITE)
    spin = va + 0x10
    code = b"\x90\x90\xeb\xfe"  # nop; nop; jmp $ -> the thread parks at spin + 2
    target.write(spin, code)
    target.protect(va, 0x1000, PAGE_EXECUTE_READ)
    thread_id = target.remote_call(spin, 0, wait=False)
    try:
        deadline = time.monotonic() + 10
        while not any(t.rip == spin + 2 for t in target.thread_contexts().threads):
            assert time.monotonic() < deadline, "the spinning thread never got there"
        with pytest.raises(BusyError) as info:
            target.commit([CommitWrite(spin, code, b"\xcc" * 4)], max_attempts=5, retry_sleep_ms=1)
        assert (info.value.thread_id, info.value.rip) == (thread_id, spin + 2)
        assert "busy" in str(info.value)
        assert target.read(spin, 4) == code
        # RIP at the start of a write is fine: the new bytes are fetched fresh.
        report = target.commit([CommitWrite(spin + 2, b"\xeb\xfe", b"\xeb\xfe")])
        assert report.attempts == 1
    finally:
        # jmp $ -> ret: one byte, atomic; the thread returns and exits.
        target.commit([CommitWrite(spin + 2, b"\xeb", b"\xc3", no_suspend=True)])
        deadline = time.monotonic() + 10
        while thread_id in agent.threads(target.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread_id not in agent.threads(target.pid)
        target.free(va)


def test_suspend_resume_floor(target: AgentProcessBackend, agent: AgentClient, capsys: pytest.CaptureFixture[str]):
    per_thread = AgentProcessBackend(agent, target.pid, per_thread=True)
    try:
        floors = {"process": [], "per_thread": []}
        for _ in range(5):
            for name, backend in (("process", target), ("per_thread", per_thread)):
                report = backend.suspend_resume_floor()
                assert report.suspended and report.pause_us > 0 and report.threads >= THREADS + 1
                assert report.per_thread == (name == "per_thread")
                floors[name].append(report.pause_us)
    finally:
        per_thread.close()
    with capsys.disabled():
        for name, values in floors.items():
            values.sort()
            print(f"\nfloor pause (us) {name}: min {values[0]:.0f} median {values[len(values) // 2]:.0f}")


def test_thread_contexts_find_return_addresses_on_stacks(target: AgentProcessBackend, host: Host) -> None:
    exe = target.modules()[0]
    assert exe.name.lower() == "host.exe"
    snapshot = target.thread_contexts(exe.base_va, exe.size)
    assert len(snapshot.threads) >= THREADS + 1 and snapshot.pause_us > 0
    for state in snapshot.threads:
        assert state.stack_base > state.rsp > 0
    # Every worker has host.exe's worker() below it on its stack.
    assert sum(1 for t in snapshot.threads if t.stack_hits) >= THREADS


# --------------------------------------------------------------------------
# Errors and malformed requests
# --------------------------------------------------------------------------


def unused_pid(agent: AgentClient) -> int:
    pids = {entry.pid for entry in agent.list_processes()}
    return next(pid for pid in range(0x7FF0, 0x10000, 4) if pid not in pids)


def test_pid_that_does_not_exist_is_gone(agent: AgentClient) -> None:
    pid = unused_pid(agent)
    with pytest.raises(ProcessGoneError) as info:
        agent.process_info(pid)
    assert info.value.pid == pid
    with pytest.raises(ProcessGoneError):
        agent.open(pid)
    with pytest.raises(ProcessGoneError):
        agent.list_modules(pid)


def test_process_that_exits_while_open_is_gone(agent: AgentClient, wine_prefix: Path, dll: Path) -> None:
    short = Host(wine_prefix, dll, ["scale:1"], threads=1)
    backend = agent.open(short.pid)
    try:
        assert short.stop()[0] == 0
        with pytest.raises(ProcessGoneError):
            backend.read(short.base, 2)
        with pytest.raises(ProcessGoneError):
            backend.suspend_resume_floor()
    finally:
        backend.close()


def raw(agent: AgentClient, frame: bytes, request_id: int):
    return agent.exchange(frame, request_id)


def test_malformed_requests_get_error_replies_and_the_agent_keeps_working(
    agent: AgentClient, target: AgentProcessBackend
) -> None:
    def status(frame: bytes, request_id: int) -> int:
        reply = raw(agent, frame, request_id)
        assert reply.request_id == request_id
        if reply.status:
            reply.error()  # the error payload always decodes
        return reply.status

    assert status(encode_frame(0x7777, b"", 901), 901) == Status.UNKNOWN_OPCODE
    assert status(encode_frame(Opcode.HELLO, b"", 902, version=9), 902) == Status.BAD_VERSION
    assert status(encode_frame(Opcode.HELLO, b"x", 903), 903) == Status.BAD_PAYLOAD
    assert status(encode_frame(Opcode.OPEN, b"\x01\x00", 904), 904) == Status.BAD_PAYLOAD
    assert status(encode_frame(Opcode.READ, struct.pack("<IIQ", 0xDEAD, 4, 0x10000), 905), 905) == Status.BAD_HANDLE
    read_too_much = struct.pack("<IIQ", target.handle, MAX_PAYLOAD + 1, 0x10000)
    assert status(encode_frame(Opcode.READ, read_too_much, 906), 906) == Status.BAD_PAYLOAD
    # A count the payload cannot hold, and overlapping writes.
    huge_count = struct.pack("<IIIII", target.handle, 0, 1, 0, 1000)
    assert status(encode_frame(Opcode.COMMIT, huge_count, 907), 907) == Status.BAD_PAYLOAD
    write = struct.pack("<QHBB", 0x10000, 2, 0, 0) + b"ab" + b"cd"
    overlap = struct.pack("<QHBB", 0x10001, 1, 0, 0) + b"b" + b"e"
    commit = struct.pack("<IIIII", target.handle, 0, 1, 0, 2) + write + overlap
    assert status(encode_frame(Opcode.COMMIT, commit, 908), 908) == Status.BAD_PAYLOAD
    zero_length = struct.pack("<IIIII", target.handle, 0, 1, 0, 1) + struct.pack("<QHBB", 0x10000, 0, 0, 0)
    assert status(encode_frame(Opcode.COMMIT, zero_length, 909), 909) == Status.BAD_PAYLOAD
    # A frame longer than the limit: refused at once, its payload read and dropped.
    length = MAX_PAYLOAD + 1
    oversized = HEADER.pack(length, Opcode.HELLO, 1, 910) + bytes(length)
    assert status(oversized, 910) == Status.BAD_FRAME
    # Still in step, still working.
    assert agent.request(Opcode.HELLO)
    assert target.read(target.modules()[0].base_va, 2) == b"MZ"
    assert agent.running


def test_refused_request_raises_a_protocol_error(agent: AgentClient) -> None:
    with pytest.raises(AgentProtocolError, match="BAD_PAYLOAD"):
        agent.request(Opcode.HELLO, b"extra")


def test_agent_that_exits_is_reported(agent_exe: Path, wine_prefix: Path) -> None:
    client = AgentClient.start(agent_exe, prefix=wine_prefix)
    client.close()
    with pytest.raises(AgentProtocolError, match="agent exited"):
        client.request(Opcode.HELLO)


def test_live_agent_fixture_restarts_a_dead_agent(agent_exe: Path, wine_prefix: Path, host: Host) -> None:
    """One request that times out (and so stops the agent) must not fail the rest of the module."""
    live = LiveAgent(agent_exe, wine_prefix)
    try:
        first = live.backend(host.pid)
        live.client._proc.kill()
        live.client._proc.wait()
        second = live.backend(host.pid)
        assert live.restarts == 1 and second is not first
        assert second.modules(), "the restarted agent reads the host again"
    finally:
        live.close()
