"""Fetch the Debian sources of the corpus and build every step as a Windows DLL, incrementally.

    python -m tests.corpus.build [--out build/corpus]

For each library: ``apt-get source PACKAGE=VERSION`` (a deb-src entry is added
first when missing, see ``ensure_deb_src``), unpacked without its patches;
then the baseline (the series' non-security patches) and one step per fix,
each adding that fix's Debian patches to the tree of the step before, the
Ksplice way. Every step is compiled with the same flags by
x86_64-w64-mingw32-gcc straight from the C files (no autotools); an object is
reused whenever its source and the tree's headers are unchanged, so a step
compiles only the files its patches touch. Outputs:

- ``<lib>/<NN>-<step>/<dll>``: the DLL of each step (``00-baseline`` first);
- ``<lib>/probe.dll``: the library's probe DLL (``tests/corpus/<lib>/probe.c``),
  which imports the library's DLL by name and exports the probes host.exe calls;
- ``host.exe``: the fixtures' host (tests/fixtures/host/host.c).

Nothing downloaded or built is committed: everything lives under ``build/``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.corpus.model import Fix, Library, load_corpus, load_library
from tests.fixtures.build_fixtures import HOST_SOURCE, BuildError, Step

__all__ = ["BuiltLibrary", "DebSrcError", "build_corpus", "default_out", "ensure_deb_src"]

ROOT = Path(__file__).resolve().parents[2]
CC = "x86_64-w64-mingw32-gcc"
CFLAGS = ("-O2",)  # the same for every step of every library
LDFLAGS = ("-shared", "-Wl,--no-insert-timestamp")
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/hotpatch-deb-src.sources")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SOURCES_LIST = Path("/etc/apt/sources.list")


class DebSrcError(RuntimeError):
    """Debian sources cannot be fetched here (no deb-src entry and not root, or apt failed)."""


def default_out() -> Path:
    return Path(os.environ.get("HOTPATCH_CORPUS") or ROOT / "build" / "corpus")


# ── Debian sources ─────────────────────────────────────────────────────────


def _has_deb_src() -> bool:
    texts = [p.read_text() for p in (SOURCES_LIST, *Path("/etc/apt/sources.list.d").glob("*")) if p.is_file()]
    return any(line.strip().startswith(("deb-src ", "Types: deb-src")) for t in texts for line in t.splitlines())


def ensure_deb_src() -> None:
    """Make ``apt-get source`` work: add deb-src entries mirroring the deb ones, then ``apt-get update``.

    Idempotent; needs root only when the entry is missing.
    """
    if _has_deb_src():
        return
    if os.geteuid() != 0:
        raise DebSrcError("no deb-src entry in APT's sources and not root: run `make corpus` as root once")
    target = DEB_SRC_FILE
    if DEBIAN_SOURCES.is_file():  # deb822, as Debian 12 installs it
        text = "\n".join(
            "Types: deb-src" if line.strip() == "Types: deb" else line
            for line in DEBIAN_SOURCES.read_text().splitlines()
        )
    else:
        lines = SOURCES_LIST.read_text().splitlines() if SOURCES_LIST.is_file() else []
        text = "\n".join("deb-src " + line[4:] for line in lines if line.startswith("deb "))
        target = target.with_suffix(".list")  # the one-line format
    if "deb-src" not in text:
        raise DebSrcError("found no Debian deb entry to mirror as deb-src")
    target.write_text(text + "\n")
    _run(["apt-get", "update", "-qq"], cwd=Path("/"))


def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"$ cd {cwd} && {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def fetch_source(lib: Library, out: Path) -> Path:
    """The unpacked, unpatched Debian source tree of ``lib`` (downloaded once)."""
    where = out / "debian" / f"{lib.package}_{lib.version}"
    tree = where / "tree"
    if (tree / "debian" / "patches" / "series").is_file():
        return tree
    where.mkdir(parents=True, exist_ok=True)
    if not list(where.glob("*.dsc")):
        ensure_deb_src()
        _run(["apt-get", "source", "--download-only", "-qq", f"{lib.package}={lib.version}"], cwd=where)
    (dsc,) = where.glob("*.dsc")
    shutil.rmtree(tree, ignore_errors=True)
    _run(["dpkg-source", "--no-check", "--skip-patches", "-x", dsc.name, "tree"], cwd=where)
    return tree


def series(tree: Path) -> list[str]:
    text = (tree / "debian" / "patches" / "series").read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


# ── compiling ──────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class BuiltLibrary:
    """The built steps of one library: ``steps[0]`` is the baseline, ``steps[i]`` follows ``fixes[i-1]``."""

    library: Library
    steps: tuple[Path, ...]
    probe: Path
    compiled: int  # objects compiled by this run (the rest came from the cache)

    def pair(self, fix: Fix) -> tuple[Path, Path]:
        index = [f.name for f in self.library.fixes].index(fix.name)
        return self.steps[index], self.steps[index + 1]


def _headers_digest(work: Path) -> str:
    digest = hashlib.sha256()
    for header in sorted(work.rglob("*.h")):
        digest.update(str(header.relative_to(work)).encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()


def _compile_all(lib: Library, work: Path, objects: Path, jobs: int) -> tuple[list[Path], int]:
    """Objects of every source file in the tree's current state, compiling only those not cached."""
    srcdir = work / lib.srcdir
    includes = [f"-I{os.path.relpath(work / d, srcdir)}" for d in lib.include]
    flags = (*CFLAGS, *includes, *(f"-D{d}" for d in lib.defines))
    headers = _headers_digest(work)
    todo, result = [], []
    for name in lib.sources:
        key = hashlib.sha256("\0".join((*flags, name, headers)).encode() + (srcdir / name).read_bytes())
        obj = objects / f"{Path(name).stem}-{key.hexdigest()[:20]}.o"
        result.append(obj)
        if not obj.exists():
            todo.append((name, obj))

    def one(item: tuple[str, Path]) -> None:
        name, obj = item
        tmp = obj.with_suffix(".tmp")
        _run([CC, *flags, "-c", name, "-o", str(tmp)], cwd=srcdir)
        tmp.replace(obj)  # a killed compile never leaves a cached object behind

    objects.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    return result, len(todo)


def _link(lib: Library, objs: list[Path], dll: Path) -> None:
    argv = [CC, *(str(o) for o in objs), "-o", str(dll), *LDFLAGS, f"-Wl,--image-base={lib.image_base:#x}", *lib.libs]
    stamp = dll.with_name(dll.name + ".cmd")
    text = "\n".join(argv) + "\n"
    if dll.exists() and stamp.exists() and stamp.read_text() == text:
        return
    dll.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    _run(argv, cwd=dll.parent)
    stamp.write_text(text)


def _patch(work: Path, patch: Path) -> None:
    _run(["patch", "-p1", "--quiet", "--forward", "--no-backup-if-mismatch", "-i", str(patch)], cwd=work)


def _prepare(lib: Library, tree: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(tree, work, symlinks=True)
    for patch in lib.baseline_patches:
        _patch(work, tree / "debian" / "patches" / patch)
    for dest, src in lib.copies.items():
        shutil.copyfile(work / src, work / dest)
    for dest, text in lib.generated.items():
        (work / dest).write_text(text.lstrip())


def _step_name(index: int, fix: Fix | None) -> str:
    return f"{index:02d}-{fix.name if fix else 'baseline'}"


def build_library(lib: Library, out: Path, jobs: int = 2) -> BuiltLibrary:
    tree = fetch_source(lib, out)
    lib = load_library(lib.dir, series(tree))  # fixes in the order of the Debian series
    work = out / "work" / lib.name
    objects = out / "obj" / lib.name
    _prepare(lib, tree, work)
    steps, compiled = [], 0
    for index, fix in enumerate((None, *lib.fixes)):
        for patch in fix.patches if fix else ():
            _patch(work, tree / "debian" / "patches" / patch)
        objs, made = _compile_all(lib, work, objects, jobs)
        compiled += made
        dll = out / lib.name / _step_name(index, fix) / lib.dll
        _link(lib, objs, dll)
        steps.append(dll)
    probe = _build_probe(lib, out, steps[0])
    return BuiltLibrary(lib, tuple(steps), probe, compiled)


def _run_step(step: Step) -> None:
    if not step.up_to_date():
        step.run()


def _build_probe(lib: Library, out: Path, baseline: Path) -> Path:
    """The probe DLL: imports the library's DLL by name (linked against the baseline's exports)."""
    probe = out / "probes" / f"{lib.name}.dll"
    work = out / "work" / lib.name
    includes = [f"-I{work / d}" for d in lib.include]
    inputs = [lib.probe_source.parent.parent / "probe.h"]
    if lib.inputs:  # e.g. the PNG files libpng's probes decode, as a C header
        header = probe.with_name(f"{lib.name}_inputs.h")
        text = importlib.import_module(lib.inputs).header()
        if not header.exists() or header.read_text() != text:
            header.parent.mkdir(parents=True, exist_ok=True)
            header.write_text(text)
        inputs.append(header)
    argv = (CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", *includes, f"-I{probe.parent}",
            lib.probe_source.name, str(baseline), "-o", str(probe), *LDFLAGS, *lib.libs)
    _run_step(Step(probe, (lib.probe_source, baseline, *inputs), argv, lib.dir))
    return probe


def host_exe(out: Path) -> Path:
    exe = out / "host.exe"
    argv = (CC, "-std=c99", "-O2", "-Wall", "-Wextra", HOST_SOURCE.name, "-o", str(exe), "-Wl,--no-insert-timestamp")
    _run_step(Step(exe, (HOST_SOURCE,), argv, HOST_SOURCE.parent))
    return exe


def build_corpus(out: Path | None = None, jobs: int = 2) -> list[BuiltLibrary]:
    """Build every library's steps, probes and the host; return them (steps in series order)."""
    out = (out or default_out()).resolve()
    host_exe(out)
    return [build_library(lib, out, jobs) for lib in load_corpus()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        built = build_corpus(args.out, args.jobs)
    except (BuildError, DebSrcError) as exc:
        print(f"corpus build failed: {exc}", file=sys.stderr)
        return 1
    for b in built:
        print(f"{b.library.name}: {len(b.steps)} steps, {b.compiled} objects compiled")
    print(f"built in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
