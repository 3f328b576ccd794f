"""Parts of native/ built for this machine with gcc (no Wine), for the readers' tests and fuzz runs:
the package reader (native/hpk/) as ``hpk_check`` and ``libhpk.so``, and the agent's request parser
(native/agent/wire.c, requests.c) as ``wire_check``; plain or under AddressSanitizer and UBSan."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HPK_SOURCES = ROOT / "native" / "hpk"
AGENT_SOURCES = ROOT / "native" / "agent"
HPK_BUILD = ROOT / "build" / "hpk"
WIRE_BUILD = ROOT / "build" / "agent-wire"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


def compile_native(output: Path, sources: list[Path], flags: list[str]) -> Path:
    """``output`` built from ``sources`` (their folder on the include path) with CFLAGS and ``flags``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=output.name + ".", dir=output.parent)
    os.close(fd)
    command = ["gcc", *CFLAGS, *flags, "-I", str(sources[0].parent), *map(str, sources), "-o", scratch]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        os.unlink(scratch)
        raise RuntimeError(f"gcc failed for {output.name}:\n{result.stderr}")
    os.chmod(scratch, 0o755)
    os.replace(scratch, output)  # atomic: concurrent test runs never see a half-written binary
    return output


def build_check(out_dir: Path = HPK_BUILD, sanitize: bool = False) -> Path:
    """hpk_check, plain or with ASan+UBSan."""
    name = "hpk_check_asan" if sanitize else "hpk_check"
    flags = SANITIZE if sanitize else ["-O2"]
    return compile_native(out_dir / name, [HPK_SOURCES / "hpk_check.c", HPK_SOURCES / "hpk_reader.c"], flags)


def build_library(out_dir: Path = HPK_BUILD) -> Path:
    """libhpk.so, for ctypes."""
    return compile_native(out_dir / "libhpk.so", [HPK_SOURCES / "hpk_reader.c"], ["-O2", "-fPIC", "-shared"])


def build_wire_check(out_dir: Path = WIRE_BUILD) -> Path:
    """wire_check with ASan+UBSan."""
    sources = [AGENT_SOURCES / name for name in ("wire_check.c", "wire.c", "requests.c")]
    return compile_native(out_dir / "wire_check_asan", sources, SANITIZE)
