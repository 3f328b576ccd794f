"""A pid that Windows or Wine gave to a new process after the patched one exited is never rolled back.

The journal is keyed by pid and process start time; a rollback pointed at the
pid finds the new process, which holds none of the journaled packages. It must
say so in one line with its own exit code (6), and change nothing: not the new
process's memory, not the journal of the process that exited. The emulator
backend plays both processes (an emulated process's pid is the host's to give,
so the reuse is made by handing the second process the first one's pid).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.diff.compare import diff
from hotpatch.errors import PidReusedError, StepFailedError
from hotpatch.package.builder import build_package
from hotpatch.package.format import package_id_of
from tests.fixtures.cases import Case


def _engine(backend: EmulatorBackend, state: Path) -> Engine:
    return Engine(backend, Journal(state), allow_unsigned=True, trusted_keys=[])


def _image(backend: EmulatorBackend) -> bytes:
    (module,) = [m for m in backend.modules() if m.name.lower() == "baseline.dll"]
    return backend.read(module.base_va, module.size)


def test_rollback_at_a_reused_pid_is_refused_with_its_own_exit_code_and_changes_nothing(
    cases: list[Case], tmp_path: Path
) -> None:
    case = next(c for c in cases if c.name == "body_change")
    package = build_package(diff(case.baseline, case.patched))
    state = tmp_path / "state"
    first = EmulatorBackend.load(case.baseline)
    with _engine(first, state).transaction() as tx:
        tx.apply(package)
    earlier = Journal(state).path_for(first.pid, first.process_start_time())
    journal_text = earlier.read_text()
    first.close()  # the patched process exits without a rollback

    second = EmulatorBackend.load(case.baseline)
    second.pid = first.pid  # the pid goes to a new process (Wine hands out small pids again)
    assert second.process_start_time() != first.process_start_time()
    before = _image(second)
    engine = _engine(second, state)
    for package_id in (None, package_id_of(package)):
        with pytest.raises(StepFailedError) as info:
            with engine.transaction() as tx:
                tx.rollback(package_id)
        error = info.value
        assert isinstance(error.cause, PidReusedError) and error.exit_code == 6, error
        message = str(error)
        assert "\n" not in message and "pid was reused" in message and "nothing was changed" in message, message
        assert package_id_of(package) in message
    assert _image(second) == before
    assert earlier.read_text() == journal_text
    assert not engine.process_journal.path.exists()
    assert engine.status().packages == ()

    # a package the earlier process never held is just not applied: no word of reuse
    with pytest.raises(StepFailedError) as info:
        with engine.transaction() as tx:
            tx.rollback("0" * 16)
    assert not isinstance(info.value.cause, PidReusedError) and info.value.exit_code == 1
    second.close()
