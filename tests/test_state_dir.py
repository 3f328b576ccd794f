"""The state directory and journal files: private, never through a planted link (no process needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hotpatch.apply.journal import Journal
from hotpatch.errors import JournalError


def journal_in(state: Path):  # noqa: ANN201 - a ProcessJournal
    return Journal(state).process(42, 1234)


def saved(state: Path) -> None:
    journal = journal_in(state)
    journal.new_record(package_id="p", baseline_id="b", sequence=1, module_name="m.dll", module_base=0x10000)
    journal.save()


def test_state_directory_and_journal_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    saved(state)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "42-1234.json").st_mode) == 0o600
    assert [r.package_id for r in journal_in(state).records] == ["p"]


def test_a_symlink_planted_at_the_temporary_file_is_not_followed(tmp_path: Path) -> None:
    state, victim = tmp_path / "state", tmp_path / "victim.txt"
    saved(state)
    victim.write_text("precious\n")
    (state / "42-1234.json.tmp").symlink_to(victim)
    saved(state)
    assert victim.read_text() == "precious\n"
    assert json.loads((state / "42-1234.json").read_text())["pid"] == 42
    assert not (state / "42-1234.json.tmp").exists() and not (state / "42-1234.json.tmp").is_symlink()


def test_a_symlinked_journal_is_not_read(tmp_path: Path) -> None:
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    saved(elsewhere)
    saved(state)
    os.unlink(state / "42-1234.json")
    (state / "42-1234.json").symlink_to(elsewhere / "42-1234.json")
    with pytest.raises(JournalError, match="symbolic link"):
        journal_in(state)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_state_directory_others_can_use_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    saved(state)
    os.chmod(state, mode)
    with pytest.raises(JournalError, match="state directory refused"):
        journal_in(state)
    with pytest.raises(JournalError, match="state directory refused"):
        Journal(state).known()


def test_a_state_directory_others_may_only_read_is_closed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    saved(state)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def test_a_state_directory_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    saved(state)
    owner = os.stat(state).st_uid
    if owner == 0:
        os.chown(state, 4242, -1)  # root may give it away; root-owned directories are accepted
    else:
        monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(JournalError, match="owned by uid"):
        journal_in(state)


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    saved(real)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(JournalError, match="symbolic link"):
        journal_in(tmp_path / "link")


def test_a_lock_symlink_is_refused(tmp_path: Path) -> None:
    state, victim = tmp_path / "state", tmp_path / "victim.txt"
    saved(state)
    victim.write_text("precious\n")
    (state / "42-1234.json.lock").symlink_to(victim)
    journal = journal_in(state)
    with pytest.raises(JournalError, match="symbolic link"), journal.locked():
        pass
    assert victim.read_text() == "precious\n"


def test_a_journal_moved_to_another_process_name_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    saved(state)
    os.rename(state / "42-1234.json", state / "42-9999.json")
    with pytest.raises(JournalError, match="another process"):
        Journal(state).process(42, 9999)


def test_journals_of_an_exited_pid_are_closed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for pid, start in ((42, 1234), (42, 5678), (43, 1234)):
        journal = Journal(state).process(pid, start)
        journal.new_record(package_id="p", baseline_id="b", sequence=1, module_name="m.dll", module_base=0x10000)
        journal.save()
    assert Journal(state).close_exited(42) == 2
    assert Journal(state).known() == [(43, 1234)]
    assert sorted(p.name for p in state.iterdir()) == ["43-1234.json"]
