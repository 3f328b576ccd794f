"""Running Windows programs under Wine on Linux: the command, its environment, the prefix.

On Linux the agent (and, in the tests, the fixture hosts) run under Wine. A
Wine process can only see and patch processes served by the same wineserver,
so everything that talks to one target uses the same WINEPREFIX: by default
``$HOTPATCH_WINEPREFIX``, else ``$WINEPREFIX``, else ``~/.wine`` (Wine's own
default). The helpers silence Wine's debug channels, keep it headless, and fail
with a ``WineError`` naming the packages to install when Wine is missing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import WineError

__all__ = [
    "PACKAGES",
    "WineMissing",
    "default_prefix",
    "ensure_prefix",
    "ended_silently",
    "wine_command",
    "wine_env",
    "wine_session",
    "wineserver_command",
    "windows_path",
]

# Debian's wine64 package installs the loader here without putting it on PATH.
DEBIAN_WINE64 = Path("/usr/lib/wine/wine64")
PACKAGES = "wine64 gcc-mingw-w64-x86-64"
#: seconds wine_session waits for a wineserver already up (not started persistent by it) to end
SERVER_WAIT = 30

#: Older name of ``WineError`` kept for callers that catch "Wine is missing".
WineMissing = WineError

#: How many times a program is started when its starts end silently (``ended_silently``).
START_ATTEMPTS = 2


def ended_silently(stdout: str | bytes, stderr: str | bytes) -> bool:
    """Whether a Wine program that has ended did so without writing a byte to stdout or stderr.

    That is Wine's failure to start it, not the program's: a Wine process
    whose wineserver goes away while it starts (e.g. a server with
    persistence 0, Debian's default, shutting down as the last program ends)
    exits with 0 or -3 having printed nothing. Callers start such a program
    once more (``START_ATTEMPTS``), and never one that printed anything.
    """
    return not stdout and not stderr


def default_prefix() -> Path:
    """The prefix used when none is given: HOTPATCH_WINEPREFIX, else WINEPREFIX, else ~/.wine."""
    for name in ("HOTPATCH_WINEPREFIX", "WINEPREFIX"):
        value = os.environ.get(name)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".wine"


def wine_command() -> list[str]:
    """The argv prefix that runs a 64-bit Windows program."""
    found = shutil.which("wine64")
    if found:
        return [found]
    if DEBIAN_WINE64.exists():
        return [str(DEBIAN_WINE64)]
    raise WineError(f"wine64 not found; install the Debian packages: apt-get install {PACKAGES}")


def wineserver_command() -> list[str]:
    """The wineserver that belongs to ``wine_command()``."""
    sibling = Path(wine_command()[0]).with_name("wineserver")
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which("wineserver")
    if found:
        return [found]
    raise WineError(f"wineserver not found; install the Debian packages: apt-get install {PACKAGES}")


def wine_env(prefix: Path | None = None) -> dict[str, str]:
    """The environment for Wine with the given (or default) prefix, quiet and headless."""
    env = dict(os.environ)
    env.update(
        WINEPREFIX=str(Path(prefix if prefix is not None else default_prefix()).resolve()),
        WINEDEBUG="-all",
        # Without this wineboot offers to download Mono and Gecko.
        WINEDLLOVERRIDES="mscoree,mshtml=",
    )
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


def ensure_prefix(prefix: Path | None = None, timeout: float = 300) -> Path:
    """Create the Wine prefix once (wineboot), safely across parallel processes."""
    prefix = Path(prefix if prefix is not None else default_prefix()).resolve()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f".{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The wineserver saves system.reg when it exits, so it marks a prefix
        # whose first boot has completed.
        if not (prefix / "system.reg").exists():
            env = wine_env(prefix)
            proc = subprocess.run(
                [*wine_command(), "wineboot", "-u"],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if proc.returncode == 0:
                subprocess.run([*wineserver_command(), "-w"], env=env, timeout=timeout)
            if proc.returncode != 0 or not (prefix / "system.reg").exists():
                raise WineError(f"wineboot failed for {prefix} (exit {proc.returncode}):\n{proc.stderr}")
    return prefix


@contextmanager
def wine_session(prefix: Path | None = None, timeout: float = 300) -> Iterator[Path]:
    """Keep one wineserver and Wine's own processes up for the prefix meanwhile.

    Without it every run starts them anew (about 2 s), and they inherit the
    first program's stdout, so a reader waiting for EOF waits until they exit.
    Booting them here with null handles makes a run take a few tens of ms.
    """
    prefix = ensure_prefix(prefix, timeout)
    env = wine_env(prefix)
    server = wineserver_command()
    _persistent_server(server, env, timeout)
    try:
        subprocess.run(
            [*wine_command(), "wineboot"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=True,
        )
        yield prefix
    finally:
        # Ends the server and every Wine process of this prefix, and only those.
        subprocess.run([*server, "-k"], env=env, stdin=subprocess.DEVNULL, timeout=timeout)


def _persistent_server(server: list[str], env: dict[str, str], timeout: float) -> None:
    """Start the prefix's wineserver with infinite persistence (-p), waiting out one already up.

    -p fails (exit 2) when a server is up, and leaves that server as it is.
    One that a Wine program started by itself has Debian's persistence 0
    (its wrapper script passes -p0): it exits the moment the last program
    ends, and a program starting in that moment ends silently. So such a
    server (typically one shutting down) is waited for, then ours started.
    """
    if _start_persistent(server, env, timeout):
        return
    try:
        subprocess.run([*server, "-w"], env=env, stdin=subprocess.DEVNULL, timeout=SERVER_WAIT)
    except subprocess.TimeoutExpired:
        return  # another session's server: keep using it, as before
    _start_persistent(server, env, timeout)


def _start_persistent(server: list[str], env: dict[str, str], timeout: float) -> bool:
    # it daemonizes once its socket is ready, so the programs started next find it up
    started = subprocess.run([*server, "-p"], env=env, stdin=subprocess.DEVNULL, timeout=timeout)
    return started.returncode == 0


def windows_path(path: Path) -> str:
    """The path as a Windows program sees it (Wine maps Z: to /)."""
    return "Z:" + str(Path(path).resolve()).replace("/", "\\")
