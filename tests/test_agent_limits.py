"""hotpatch-agent.exe at its limits, under Wine: a process with thousands of
modules (the listing's count once lived in a freed buffer) and address
ranges at the top of the address space (a WRITE there once wrapped the page
loop and grew the agent by gigabytes)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.protocol import Opcode, Status, encode_frame
from hotpatch.cli import commands as cli
from hotpatch.errors import AgentProtocolError
from hotpatch.process.winehost import windows_path
from tests.support.hosts import Host

COPIES = 2000
TOP = 0xFFFF_FFFF_FFFF_FFF0


@pytest.fixture(scope="module")
def crowded(wine_prefix: Path, built_fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """host.exe with the 12 KB body_change DLL loaded 1 + 2,000 times, under as many names."""
    dll = built_fixtures / "body_change" / "baseline-stripped.dll"
    copies = tmp_path_factory.mktemp("copies")
    started = time.monotonic()
    host = Host(wine_prefix, dll, ["scale:7"], threads=1,
                extra=("--copies", str(COPIES), windows_path(copies)), timeout=900)
    print(f"{COPIES} copies loaded in {time.monotonic() - started:.1f} s")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def host(crowded: Host) -> Host:
    """The process the shared ``target`` fixture opens."""
    return crowded


def test_listing_thousands_of_modules_counts_them_all(agent: AgentClient, crowded: Host) -> None:
    started = time.monotonic()
    modules = agent.list_modules(crowded.pid)
    elapsed = time.monotonic() - started
    copies = [m for m in modules if m.name.lower().startswith("copy") and m.name.lower().endswith(".dll")]
    print(f"{len(modules)} modules listed in {elapsed:.2f} s")
    assert sorted(m.name.lower() for m in copies) == [f"copy{i:05d}.dll" for i in range(COPIES)]
    assert len({m.base_va for m in modules}) == len(modules)
    assert modules[0].name.lower() == "host.exe"


def test_ps_finds_a_module_of_a_crowded_process(
    crowded: Host, wine_prefix: Path, agent_exe: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOTPATCH_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))
    last = f"copy{COPIES - 1:05d}.dll"
    assert cli.main(["ps", "--module", last, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (process,) = [p for p in doc["processes"] if p["pid"] == crowded.pid]
    (row,) = process["modules"]
    assert row["name"].lower() == last and "timedatestamp" in row


def test_ranges_at_the_top_of_the_address_space_are_refused_at_once(
    agent: AgentClient, target: AgentProcessBackend
) -> None:
    handle = target.handle
    frames = {
        "WRITE": encode_frame(Opcode.WRITE, struct.pack("<IQ", handle, TOP) + b"\xcc" * 5, 0),
        "READ": encode_frame(Opcode.READ, struct.pack("<IIQ", handle, 16, TOP), 0),
        "PROTECT": encode_frame(Opcode.PROTECT, struct.pack("<IIQQ", handle, 0x40, TOP, 16), 0),
        "FLUSH": encode_frame(Opcode.FLUSH, struct.pack("<IQQ", handle, TOP, 16), 0),
        "COMMIT": encode_frame(Opcode.COMMIT, struct.pack("<IIIII", handle, 0, 1, 0, 1)
                               + struct.pack("<QHBB", TOP, 5, 0, 0) + bytes(10), 0),
    }
    for name, frame in frames.items():
        request_id = agent.next_request_id()
        frame = frame[:8] + struct.pack("<I", request_id) + frame[12:]
        started = time.monotonic()
        reply = agent.exchange(frame, request_id, timeout=30)
        elapsed = time.monotonic() - started
        assert reply.status == Status.BAD_PAYLOAD, name
        assert "outside the user address space" in reply.error().message, name
        assert elapsed < 5, f"{name} took {elapsed:.1f} s"
    with pytest.raises(AgentProtocolError, match="BAD_PAYLOAD"):
        target.write(TOP, b"\xcc" * 5)
    # and the agent is still in step and working
    assert target.read(target.modules()[0].base_va, 2) == b"MZ"
