"""The health gate of ``hotpatch apply --soak/--health`` against a running multi-threaded host under Wine.

host.exe runs body_change/baseline.dll with 4 threads calling scale(7), add(2, 3) and
scale_then_xor(10, 1); the package (tests/support/packages.simple) makes scale(7) 33.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply import cli
from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.backend import Module
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.package.format import save
from tests.support.hosts import Host
from tests.support.live import BASELINE, CALLS, image_of, wait_values
from tests.support.packages import simple

PATCHED = {"scale": 33, "scale_then_xor": 49, "add": 5}


@pytest.fixture(scope="module")
def host(wine_prefix: Path, dll: Path) -> Iterator[Host]:
    running = Host(wine_prefix, dll, CALLS, threads=4)
    yield running
    code, stderr = running.stop()
    assert code == 0, f"host.exe exited with {code}: {stderr}"
    for name, allowed in {"scale": {22, 33}, "add": {5}, "scale_then_xor": {30, 49}}.items():
        seen = {v for values in running.observed(0, name) for v in values}
        assert seen <= allowed, f"{name} returned {sorted(seen - allowed)}"


@pytest.fixture
def run(tmp_path: Path, wine_prefix: Path, agent_exe: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("HOTPATCH_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))

    def run(*argv: str) -> tuple[int, dict, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, json.loads(out), err

    return run


def test_failing_probe_after_commit_rolls_back_and_the_process_keeps_its_original_code(
    tmp_path: Path, host: Host, target: AgentProcessBackend, module: Module, dll: Path, run
) -> None:
    package = tmp_path / "scale.hpk"
    save(simple(dll), package)
    before = image_of(target, module)
    # the probe passes while the package is new, then fails: the gate must have seen the patched code
    marker = tmp_path / "probe-count"
    probe = (f"cmd:{sys.executable} -c \"import pathlib, sys; p = pathlib.Path(r'{marker}'); "
             "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); sys.exit(0 if n < 2 else 5)\"")
    mark = host.mark()
    code, document, err = run("apply", str(package), "--pid", str(host.pid), "--allow-unsigned", "--json",
                              "--soak", "60s", "--probe-interval", "100ms", "--health", "alive",
                              "--health", "sites", "--health", probe)
    assert code == 1
    (result,) = document["results"]
    assert result["status"] == "rolled_back" and result["health"]["failed"]["check"] == probe
    assert result["health"]["rolled_back"] == [host.pid] and result["health"]["rounds"] == 3
    line = err.strip()
    assert "\n" not in line and line.startswith(f"hotpatch: error: health check '{probe}' failed: exit 5")
    assert line.endswith(f"rolled back {result['package_id']} from pid {host.pid}")
    # patched while it soaked, original again now, the process never stopped
    assert (33,) in host.observed(mark, "scale")
    wait_values(host, BASELINE)
    assert image_of(target, module) == before
    assert host.proc.poll() is None
    with Engine(target, Journal(tmp_path / "state")).process_journal.locked() as journal:
        (record,) = journal.records
    assert record.phase == "rolled_back"
    health = [(e["state"], e["check"]) for e in record.events if e.get("step") == "health"]
    assert health == [("failed", probe), ("rolled_back", probe)]


def test_passing_gate_keeps_the_package_and_no_auto_rollback_leaves_a_failure_applied(
    tmp_path: Path, host: Host, agent: AgentClient, target: AgentProcessBackend, dll: Path, run
) -> None:
    package = tmp_path / "scale.hpk"
    save(simple(dll), package)
    code, document, _ = run("apply", str(package), "--pid", str(host.pid), "--allow-unsigned", "--json",
                            "--soak", "1s", "--probe-interval", "200ms")
    assert code == 0
    (result,) = document["results"]
    assert result["status"] == "applied" and result["health"]["ok"] and result["health"]["rounds"] >= 2
    wait_values(host, PATCHED)
    assert run("rollback", "--pid", str(host.pid), "--json")[0] == 0
    wait_values(host, BASELINE)

    code, document, err = run("apply", str(package), "--pid", str(host.pid), "--allow-unsigned", "--json",
                              "--soak", "1s", "--health", "cmd:false", "--no-auto-rollback")
    assert code == 1 and "left applied (no auto-rollback)" in err
    assert document["results"][0]["status"] == "applied"
    wait_values(host, PATCHED)
    assert run("rollback", "--pid", str(host.pid), "--json")[0] == 0
    wait_values(host, BASELINE)


def test_unparsable_soak_or_check_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--soak", "soon"], ["--health", "telepathy"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["apply", str(tmp_path / "none.hpk"), "--pid", "1", *bad])
        assert info.value.code == 2
        assert "error: argument" in capsys.readouterr().err.strip().splitlines()[-1]
