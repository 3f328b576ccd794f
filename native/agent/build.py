"""Build hotpatch-agent.exe with mingw-w64.

    python native/agent/build.py --out build/agent [--trace]

setup.py calls ``build_agent`` to put the agent into the package
(hotpatch/bin/); the tests call it to build into build/agent/. The agent is
linked statically (libgcc included), so it needs only Windows' own DLLs
(kernel32, advapi32, msvcrt). The build is skipped when the output is newer
than every source and was made by the same command line (kept in
``<output>.cmd``). The compiler runs inside this directory with relative
source names, so no machine path ends up in the binary.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["AGENT_NAME", "CC", "AgentBuildError", "build_agent", "compiler_available", "main"]

AGENT_DIR = Path(__file__).resolve().parent
AGENT_NAME = "hotpatch-agent.exe"
CC = "x86_64-w64-mingw32-gcc"
PACKAGES = "gcc-mingw-w64-x86-64"
SOURCES = ("main.c", "wire.c", "requests.c", "protocol.c", "procs.c", "memory.c", "freeze.c", "remote.c")
HEADERS = ("agent.h", "wire.h")
CFLAGS = (
    "-std=c99",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    # Windows 7 API level: GetThreadId, QueryFullProcessImageNameW.
    "-D_WIN32_WINNT=0x0601",
)
LDFLAGS = ("-static", "-s", "-Wl,--no-insert-timestamp")
LIBS = ("-lkernel32", "-ladvapi32")


class AgentBuildError(Exception):
    """The compiler is missing or failed; the message says which and why."""


def compiler_available(cc: str = CC) -> bool:
    return shutil.which(cc) is not None


def _command(output: Path, cc: str, trace: bool) -> list[str]:
    defines = ["-DAGENT_TRACE=1"] if trace else []
    return [cc, *CFLAGS, *defines, *SOURCES, *LDFLAGS, "-o", str(output), *LIBS]


def build_agent(out_dir: Path, *, cc: str = CC, trace: bool = False, force: bool = False, record: bool = True) -> Path:
    """Compile the agent into ``out_dir``; its path.

    With ``record`` the command line is kept beside the output and an
    up-to-date output is reused; without it (package builds) it is always
    compiled and nothing else is left in ``out_dir``.
    """
    if not compiler_available(cc):
        raise AgentBuildError(f"{cc} not found; install the Debian package {PACKAGES}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / AGENT_NAME
    stamp = output.with_name(output.name + ".cmd")
    argv = _command(output, cc, trace)
    recorded = " ".join(argv)
    inputs = [AGENT_DIR / name for name in (*SOURCES, *HEADERS)]
    if (
        record
        and not force
        and output.exists()
        and stamp.exists()
        and stamp.read_text() == recorded
        and all(p.stat().st_mtime <= output.stat().st_mtime for p in inputs)
    ):
        return output
    proc = subprocess.run(argv, cwd=AGENT_DIR, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AgentBuildError(f"building {AGENT_NAME} failed:\n{proc.stdout}{proc.stderr}")
    if record:
        stamp.write_text(recorded)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/agent"), help="output directory")
    parser.add_argument("--trace", action="store_true", help="compile the trace output in (to stderr)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        print(build_agent(args.out, trace=args.trace, force=args.force))
    except AgentBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
