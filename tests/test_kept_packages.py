"""The packages kept beside the journal go once no record needs them, and never before.

The emulator backend plays the target (fast layer): a package applied and rolled back, one replaced by a
newer one of its baseline, a process that exited; then the crash cases: a file left by a crash between the
journal write and the removal, a prune meeting an engine between keeping a package and journaling it, an
unreadable journal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal, ProcessJournal, prune_packages
from hotpatch.diff.compare import diff
from hotpatch.package.builder import build_package
from hotpatch.package.format import content_sha256_of, package_id_of
from hotpatch.package.model import Package
from tests.fixtures.cases import Case


@pytest.fixture(scope="module")
def packages(cases: list[Case]) -> tuple[Case, Package, Package]:
    """body_change and two packages of its baseline: sequence 1, and sequence 2 that replaces it."""
    case = next(c for c in cases if c.name == "body_change")
    result = diff(case.baseline, case.patched)
    return case, build_package(result, sequence=1), build_package(result, sequence=2, description="again")


@pytest.fixture
def target(packages: tuple[Case, Package, Package]) -> Iterator[EmulatorBackend]:
    backend = EmulatorBackend.load(packages[0].baseline)
    yield backend
    backend.close()


def _engine(backend: EmulatorBackend, state: Path) -> Engine:
    return Engine(backend, Journal(state), allow_unsigned=True, trusted_keys=[])


def _applied(backend: EmulatorBackend, state: Path, package: Package) -> Engine:
    """An engine over a fresh state directory with ``package`` applied."""
    engine = _engine(backend, state)
    with engine.transaction() as tx:
        tx.apply(package)
    return engine


def _kept(state: Path) -> set[str]:
    return {path.name for path in (state / "packages").iterdir()}


def _name(package: Package) -> str:
    return content_sha256_of(package).hex() + ".hpk"


def test_a_rolled_back_package_is_removed_after_the_write_that_retires_it(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, first, _ = packages
    state = tmp_path / "state"
    engine = _applied(target, state, first)
    assert _kept(state) == {_name(first)}

    # every journal write that no longer names the package must find the file still there
    seen_at_retiring_writes: list[bool] = []
    save = ProcessJournal.save

    def watched_save(journal: ProcessJournal) -> None:
        save(journal)
        if not journal.needed_packages():
            seen_at_retiring_writes.append((state / "packages" / _name(first)).exists())

    monkeypatch.setattr(ProcessJournal, "save", watched_save)
    with engine.transaction() as tx:
        (result,) = tx.rollback(package_id_of(first))
    assert result.released is True
    assert seen_at_retiring_writes and all(seen_at_retiring_writes)
    assert _kept(state) == set()
    # the record itself stays, finished, for the history
    assert [r.phase for r in engine.process_journal.records] == ["rolled_back"]


def test_a_replaced_package_goes_and_its_successor_stays(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path
) -> None:
    _, first, second = packages
    state = tmp_path / "state"
    engine = _applied(target, state, first)
    with engine.transaction() as tx:
        result = tx.apply(second)
    assert result.replaced == package_id_of(first)
    assert _kept(state) == {_name(second)}
    with engine.transaction() as tx:
        tx.rollback()
    assert _kept(state) == set()


def test_a_package_applied_to_two_processes_stays_while_one_still_holds_it(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path
) -> None:
    case, first, _ = packages
    state = tmp_path / "state"
    other = EmulatorBackend.load(case.baseline)
    try:
        engines = [_applied(backend, state, first) for backend in (target, other)]
        with engines[0].transaction() as tx:
            tx.rollback()
        assert _kept(state) == {_name(first)}
        with engines[1].transaction() as tx:
            tx.rollback()
        assert _kept(state) == set()
    finally:
        other.close()


def test_the_package_of_an_exited_process_goes_with_its_journal(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path
) -> None:
    _, first, _ = packages
    state = tmp_path / "state"
    _applied(target, state, first)
    assert Journal(state).close_exited(target.pid) == 1
    assert _kept(state) == set()


def test_recover_removes_what_a_crash_left_and_keeps_what_records_need(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path
) -> None:
    _, first, second = packages
    state = tmp_path / "state"
    engine = _applied(target, state, first)
    # a crash after the journal stopped naming a package and before its removal; a half-written copy
    leftover = state / "packages" / _name(second)
    leftover.write_bytes(b"whatever was there")
    (state / "packages" / (_name(second) + ".tmp")).write_bytes(b"half")
    engine.recover()
    assert _kept(state) == {_name(first)}
    # the package still applied is intact: rollback reads it again and checks it
    with engine.transaction() as tx:
        (result,) = tx.rollback()
    assert result.package_id == package_id_of(first)


def test_a_prune_never_meets_an_engine_between_keeping_a_package_and_journaling_it(
    packages: tuple[Case, Package, Package], tmp_path: Path
) -> None:
    _, first, _ = packages
    state = tmp_path / "state"
    journal = Journal(state).process(4242, 1)
    with journal.locked():
        digest = journal.keep_package(first)  # no record names it yet
        assert prune_packages(state) == []
        assert _kept(state) == {digest + ".hpk"}
        journal.new_record(package_sha256=digest, package_id=package_id_of(first), baseline_id="b", sequence=1,
                           module_name="baseline.dll", module_base=0x10000)
        journal.save()
    # the lock went with the journal's: a prune runs again, and the live record keeps its package
    orphan = state / "packages" / ("cd" * 32 + ".hpk")
    orphan.write_bytes(b"left by a crash")
    assert prune_packages(state) == ["cd" * 32]
    assert _kept(state) == {digest + ".hpk"}


def test_nothing_is_removed_while_a_journal_cannot_be_read(
    packages: tuple[Case, Package, Package], target: EmulatorBackend, tmp_path: Path
) -> None:
    _, first, _ = packages
    state = tmp_path / "state"
    engine = _applied(target, state, first)
    with engine.transaction() as tx:
        tx.rollback()
    orphan = state / "packages" / ("ab" * 32 + ".hpk")
    orphan.write_bytes(b"left by a crash")
    corrupt = Journal(state).path_for(77, 1)
    fd = os.open(corrupt, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    assert prune_packages(state) == []
    assert orphan.exists()
    corrupt.unlink()
    assert prune_packages(state) == ["ab" * 32]
