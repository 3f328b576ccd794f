"""Files and directories that another local user cannot redirect or plant.

The journal of a process and the user's trust store live in directories an
attacker on the same machine may try to prepare in advance: a symlink where a
temporary file will be created (the write lands in a file of the attacker's
choosing), a lock file that points elsewhere, a directory others can write to
(files swapped between our checks and our reads). Everything here refuses to
follow a link at the last component, creates files exclusively, and accepts a
directory only if it belongs to the current user (or root) and nobody else
can write to it. On Windows, whose ACLs are not modes, the link refusal stays
and the ownership checks are left to the ACLs of the profile directories.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

__all__ = ["UnsafePathError", "check_private_dir", "ensure_private_dir", "open_nofollow", "write_atomic"]

#: O_NOFOLLOW where the platform has it (not on Windows, where the checks below cover links)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_POSIX = sys.platform != "win32"


class UnsafePathError(OSError):
    """A path is a link, or a directory is writable by others or owned by someone else."""


def _owner_ok(st: os.stat_result) -> bool:
    return not _POSIX or st.st_uid in (os.getuid(), 0)


def check_private_dir(path: Path, *, shared_ok: bool = False) -> None:
    """Refuse ``path`` unless it is a real directory owned by us (or root) that others cannot write.

    ``shared_ok`` accepts group/world-readable directories (a system trust
    store is meant to be read by everyone); otherwise a directory of ours
    that others may only read is tightened to 0700 (``mkdir`` made it 0755).
    Writable by others is never accepted, nor a symlink.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    if not _owner_ok(st):
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by this user")
    if _POSIX and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")
    if _POSIX and not shared_ok and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        if st.st_uid != os.getuid():
            raise UnsafePathError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); expected 700")
        os.chmod(path, 0o700)  # ours and nobody could write to it: closing it is safe


def ensure_private_dir(path: Path, mode: int = 0o700, *, shared_ok: bool = False) -> Path:
    """Create ``path`` (and missing parents) with ``mode`` if needed, then check it as above."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass  # created meanwhile by another engine: checked below like any existing one
        else:
            os.chmod(path, mode)  # the umask may have taken bits away that we want (never adds)
    check_private_dir(path, shared_ok=shared_ok)
    return path


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (O_NOFOLLOW, plus a check where it is missing)."""
    if not _NOFOLLOW and os.path.islink(path):
        raise UnsafePathError(f"{path} is a symbolic link")
    try:
        return os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if _NOFOLLOW and exc.errno == errno.ELOOP:  # the last component is a link
            raise UnsafePathError(f"{path} is a symbolic link") from None
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: an exclusive temporary file beside it, never a link, then a rename.

    A temporary file left by a crash (or planted) is removed first, as a
    name, without following it; O_EXCL then guarantees the file we write is
    the one we created.
    """
    aside = path.with_name(path.name + ".tmp")
    try:
        os.unlink(aside)  # unlink never follows a link: a planted one is just removed
    except FileNotFoundError:
        pass
    fd = open_nofollow(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(aside, path)
    except BaseException:
        try:
            os.unlink(aside)
        except OSError:
            pass
        raise
