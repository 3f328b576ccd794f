"""Starting Wine programs: host.exe (tests/support/hosts.py) and the agent (AgentClient.start). A start that
Wine ends before the program wrote anything is tried once more; a program that wrote anything and ended is
never started again, and the error names its exit code and the end of its stderr.

A wrapper script stands in front of the command: on its first run it does what a given failure does, on
later runs it runs the real command (with Wine) or the same failure again. Each run appends a line to a
count file, so the test sees how many starts were made.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient
from hotpatch.errors import AgentProtocolError
from hotpatch.process import winehost
from hotpatch.process.winehost import wine_command
from tests.support.hosts import Host, HostEndedSilently, run_to_end

CALLS = ["add:2,3"]

# $1: the count file; $2: what the first run does; $3: what later runs do ("run" or the same failure)
WRAPPER = """#!/bin/sh
count="$1" first="$2" later="$3"
shift 3
echo start >> "$count"
what="$later"
[ "$(wc -l < "$count")" -eq 1 ] && what="$first"
case "$what" in
  silent) exit 1 ;;
  silent0) exit 0 ;;
  stdout) echo "hello from a host that dies"; exit 7 ;;
  stderr) echo "wine: something went wrong" >&2; exit 5 ;;
  run) exec "$@" ;;
esac
"""


def _wrapper(tmp_path: Path, first: str, later: str) -> list[str]:
    """The command prefix that plays ``first`` on its first run and ``later`` after it, counting runs."""
    script = tmp_path / "wrapper.sh"
    script.write_text(WRAPPER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), str(tmp_path / "starts"), first, later]


def _starts(tmp_path: Path) -> int:
    path = tmp_path / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_host_that_wine_ends_silently_is_started_once_more(
    built_fixtures: Path, wine_prefix: Path, tmp_path: Path
) -> None:
    command = _wrapper(tmp_path, "silent", "run") + wine_command()
    dll = built_fixtures.resolve() / "body_change" / "baseline.dll"
    host = Host(wine_prefix, dll, CALLS, threads=2, command=command)
    try:
        assert host.restarts == 1
        assert _starts(tmp_path) == 2
        host.wait_for_only(5, host.mark(), "add")
    finally:
        code, _ = host.stop()
    assert code == 0


@pytest.mark.parametrize("first", ["silent", "silent0"])
def test_a_host_ending_silently_twice_fails_with_its_exit_code(first: str, tmp_path: Path) -> None:
    command = _wrapper(tmp_path, first, first)
    with pytest.raises(HostEndedSilently) as info:
        Host(tmp_path / "prefix", tmp_path / "case" / "baseline.dll", CALLS, command=command)
    assert _starts(tmp_path) == 2
    message = str(info.value)
    assert f"exit code {1 if first == 'silent' else 0}" in message and "its stderr: (nothing)" in message, message


@pytest.mark.parametrize(("first", "code", "shown"), [
    ("stdout", 7, "hello from a host that dies"),
    ("stderr", 5, "wine: something went wrong"),
])
def test_a_host_that_printed_anything_is_not_started_again(first: str, code: int, shown: str, tmp_path: Path) -> None:
    command = _wrapper(tmp_path, first, "silent")
    with pytest.raises(AssertionError) as info:
        Host(tmp_path / "prefix", tmp_path / "case" / "baseline.dll", CALLS, command=command)
    assert not isinstance(info.value, HostEndedSilently)
    assert _starts(tmp_path) == 1
    message = str(info.value)
    assert f"host ended before 'pid' (exit code {code})" in message and shown in message, message


# ── the agent ────────────────────────────────────────────────────────────


def test_an_agent_that_wine_ends_silently_is_started_once_more(
    agent_exe: Path, wine_prefix: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = _wrapper(tmp_path, "silent", "run") + wine_command()
    monkeypatch.setattr(winehost, "wine_command", lambda: command)
    with AgentClient.start(agent_exe, prefix=wine_prefix, timeout=60) as client:
        assert _starts(tmp_path) == 2
        assert client.hello.agent_pid in {entry.pid for entry in client.list_processes()}


@pytest.mark.parametrize(("first", "starts", "shown"), [
    ("silent", 2, ["exited with code 1"]),
    # the hello is sent before or after the script has printed and exited: a garbled reply, or a dead pipe
    ("stdout", 1, ["above the frame limit", "exited with code 7"]),
    ("stderr", 1, ["exited with code 5", "wine: something went wrong"]),
])
def test_an_agent_is_started_again_only_after_a_silent_end(
    first: str, starts: int, shown: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = _wrapper(tmp_path, first, first)
    monkeypatch.setattr(winehost, "wine_command", lambda: command)
    with pytest.raises(AgentProtocolError) as info:
        AgentClient.start(tmp_path / "hotpatch-agent.exe", prefix=tmp_path / "prefix", timeout=30)
    assert _starts(tmp_path) == starts
    message = str(info.value)
    found = [text in message for text in shown]
    assert all(found) if first != "stdout" else any(found), message


# ── a program run to its end (tests/support/hosts.run_to_end) ──────────────


@pytest.mark.parametrize(("first", "later", "starts", "stdout"), [
    ("silent", "stdout", 2, "hello from a host that dies\n"),
    ("silent", "silent", 2, ""),
    ("stderr", "stdout", 1, ""),
    ("stdout", "silent", 1, "hello from a host that dies\n"),
])
def test_a_run_is_repeated_only_after_a_silent_end(
    first: str, later: str, starts: int, stdout: str, tmp_path: Path
) -> None:
    proc = run_to_end([*_wrapper(tmp_path, first, later), "unused"], env=dict(os.environ))
    assert _starts(tmp_path) == starts
    assert proc.stdout == stdout


# ── the wineserver of a session (winehost.wine_session) ─────────────────────

# $1: the log of calls; a `-p` fails (exit 2, a server is up) until `-w` has run, as with a server already up
FAKE_SERVER = """#!/bin/sh
log="$1"
shift
echo "$*" >> "$log"
if [ "$1" = "-p" ] && ! grep -qx -- "-w" "$log"; then exit 2; fi
exit 0
"""


@pytest.mark.parametrize("already_up", [False, True])
def test_a_session_waits_out_a_server_already_up_before_starting_its_persistent_one(
    already_up: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "wineserver.sh"
    script.write_text(FAKE_SERVER if already_up else FAKE_SERVER.replace("exit 2", "exit 0"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls"
    monkeypatch.setattr(winehost, "wineserver_command", lambda: [str(script), str(log)])
    monkeypatch.setattr(winehost, "wine_command", lambda: ["true"])
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "system.reg").write_text("")  # a prefix booted before
    with winehost.wine_session(prefix):
        calls = log.read_text().splitlines()
    assert calls == (["-p", "-w", "-p"] if already_up else ["-p"])
    assert log.read_text().splitlines()[-1] == "-k"
