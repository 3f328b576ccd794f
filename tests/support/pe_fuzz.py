"""Mutation testing of PE input through the CLI: ``info``, ``info --json``, ``functions --json``.

Seeds are fixture DLLs (mingw-w64: COFF symbols, TLS, C++ exceptions, jump
tables) and small real MSVC DLLs from numpy's win_amd64 wheel. Each mutant
changes one thing the reader must not take on faith, or a few of them:

- every header field (DOS e_lfanew, COFF file header, every optional header
  field, all 16 data directories' RVA and size, every field of every section
  header) set to an edge value: 0, 1, all ones, 2^31, the value +-1, doubled,
  the file size, random;
- the content of every data directory present (exports, imports, resources,
  exceptions/.pdata, relocations, debug, TLS, load config, IAT), the unwind
  info .pdata points to, and the COFF symbol and string tables: words set to
  edge values, bytes flipped;
- truncation (inside the headers, at and inside section data), random bit
  flips anywhere, and splices of one region over another.

Every mutant runs in-process through ``hotpatch.cli.commands.main`` (stdout and stderr
captured at the file descriptor level too, so LIEF's own C++ output would be
seen); a sample also runs as a real ``python -m hotpatch.cli`` subprocess.
The contract: exit 0 with nothing on stderr, or exit 2 with exactly one line
``hotpatch: error: ...``; never a traceback, a warning, a MemoryError or a
hang. The run sets an address-space limit on itself (``--memory-limit-mb``)
and reports its peak resident memory.

    python tests/fuzz_pe.py --cases 3000 [--seed N] [--subprocess-sample 12]

(that script is the command line; this module is its harness)
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import resource
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURE_SEEDS = ("body_change/baseline-stripped.dll", "body_change/baseline.dll", "cpp_exception/baseline-stripped.dll",
                 "switch_table/baseline-stripped.dll", "seh/baseline-stripped.dll")
#: (distribution, version, file inside the wheel): small MSVC-built DLLs
REAL_SEEDS = (("numpy", "2.1.0", "numpy/_core/_struct_ufunc_tests.cp311-win_amd64.pyd"),
              ("numpy", "2.1.0", "numpy/_core/_umath_tests.cp311-win_amd64.pyd"))
COMMANDS = (("info", "--json"), ("functions", "--json"), ("info",))
SLOW_CASE_SECONDS = 30.0

# ---------------------------------------------------------------- the seeds' structure


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int  # 1, 2, 4 or 8


@dataclass(frozen=True)
class Region:
    name: str
    offset: int
    size: int


@dataclass
class Seed:
    name: str
    data: bytes
    fields: list[Field] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # offsets worth truncating at


_COFF = (("Machine", 0, 2), ("NumberOfSections", 2, 2), ("TimeDateStamp", 4, 4), ("PointerToSymbolTable", 8, 4),
         ("NumberOfSymbols", 12, 4), ("SizeOfOptionalHeader", 16, 2), ("Characteristics", 18, 2))
_OPTIONAL = (("Magic", 0, 2), ("MajorLinkerVersion", 2, 1), ("SizeOfCode", 4, 4), ("SizeOfInitializedData", 8, 4),
             ("SizeOfUninitializedData", 12, 4), ("AddressOfEntryPoint", 16, 4), ("BaseOfCode", 20, 4),
             ("ImageBase", 24, 8), ("SectionAlignment", 32, 4), ("FileAlignment", 36, 4),
             ("MajorOperatingSystemVersion", 40, 2), ("MajorSubsystemVersion", 48, 2), ("Win32VersionValue", 52, 4),
             ("SizeOfImage", 56, 4), ("SizeOfHeaders", 60, 4), ("CheckSum", 64, 4), ("Subsystem", 68, 2),
             ("DllCharacteristics", 70, 2), ("SizeOfStackReserve", 72, 8), ("SizeOfStackCommit", 80, 8),
             ("SizeOfHeapReserve", 88, 8), ("SizeOfHeapCommit", 96, 8), ("LoaderFlags", 104, 4),
             ("NumberOfRvaAndSizes", 108, 4))
_SECTION = (("Name", 0, 8), ("VirtualSize", 8, 4), ("VirtualAddress", 12, 4), ("SizeOfRawData", 16, 4),
            ("PointerToRawData", 20, 4), ("PointerToRelocations", 24, 4), ("PointerToLinenumbers", 28, 4),
            ("NumberOfRelocations", 32, 2), ("NumberOfLinenumbers", 34, 2), ("Characteristics", 36, 4))
DIRECTORIES = ("EXPORT", "IMPORT", "RESOURCE", "EXCEPTION", "SECURITY", "BASERELOC", "DEBUG", "ARCHITECTURE",
               "GLOBALPTR", "TLS", "LOAD_CONFIG", "BOUND_IMPORT", "IAT", "DELAY_IMPORT", "CLR", "RESERVED")


def describe(name: str, data: bytes) -> Seed:
    """The seed's header fields, directory contents and truncation points, from its (valid) headers."""
    seed = Seed(name, data, [Field("e_lfanew", 0x3C, 4)])
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    coff, optional = pe + 4, pe + 24
    seed.fields += [Field(f"COFF.{n}", coff + o, s) for n, o, s in _COFF]
    seed.fields += [Field(f"Optional.{n}", optional + o, s) for n, o, s in _OPTIONAL]
    for index, directory in enumerate(DIRECTORIES):
        seed.fields += [Field(f"Directory.{directory}.RVA", optional + 112 + 8 * index, 4),
                        Field(f"Directory.{directory}.Size", optional + 116 + 8 * index, 4)]
    count, symbols, symbol_count, optional_size = struct.unpack_from("<HxxxxIIH", data, coff + 2)
    table = optional + optional_size
    sections = []
    for index in range(count):
        at = table + 40 * index
        seed.fields += [Field(f"Section{index}.{n}", at + o, s) for n, o, s in _SECTION]
        vsize, rva, raw_size, raw_offset = struct.unpack_from("<IIII", data, at + 8)
        sections.append((rva, min(vsize or raw_size, raw_size), raw_offset))
        seed.boundaries += [raw_offset, raw_offset + raw_size // 2, raw_offset + raw_size - 1]

    def offset_of(rva: int) -> int | None:
        """The file offset of an RVA inside some section's raw data."""
        for start, size, raw in sections:
            if start <= rva < start + size and raw + rva - start < len(data):
                return raw + rva - start
        return None

    for index, directory in enumerate(DIRECTORIES):
        rva, size = struct.unpack_from("<II", data, optional + 112 + 8 * index)
        at = rva if directory == "SECURITY" else offset_of(rva)
        if size and at is not None and at < len(data):
            seed.regions.append(Region(directory, at, min(size, len(data) - at)))
        if directory == "EXCEPTION" and size and at is not None:  # the unwind info the first entries point to
            entries = min(size, len(data) - at) // 12
            for entry in range(0, entries, max(entries // 8, 1)):  # eight, spread over the table
                unwind = offset_of(struct.unpack_from("<I", data, at + 12 * entry + 8)[0])
                if unwind is not None:
                    seed.regions.append(Region("UNWIND_INFO", unwind, min(16, len(data) - unwind)))
    if symbols and symbols < len(data):
        end = min(symbols + 18 * symbol_count, len(data))
        seed.regions.append(Region("COFF_SYMBOLS", symbols, end - symbols))
        if end + 4 <= len(data):
            strings = min(struct.unpack_from("<I", data, end)[0], len(data) - end)
            seed.regions.append(Region("COFF_STRINGS", end, strings))
    seed.regions.append(Region("HEADERS", 0, min(table + 40 * count, len(data))))
    seed.boundaries += [0x3C, pe + 2, coff + 10, optional + 60, optional + 112, table, table + 20, len(data) - 1]
    return seed


def load_seeds(fixtures: Path, real: bool = True) -> list[Seed]:
    seeds = [describe(name, (fixtures / name).read_bytes()) for name in FIXTURE_SEEDS]
    if real:
        from tests.support.realbins import real_binary

        seeds += [describe(f"{dist}-{version}/{Path(glob).name}", real_binary(dist, version, glob).read_bytes())
                  for dist, version, glob in REAL_SEEDS]
    return seeds


# ---------------------------------------------------------------- mutations


def _edge(rng: random.Random, value: int, size: int, file_size: int) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, top, top >> 1, (top >> 1) + 1, value + 1, value - 1, value * 2, value << 4, value >> 1,
               file_size, file_size + 1, 0x1000, 0x10000, rng.getrandbits(8 * size)]
    return rng.choice(choices) & top


def _put(data: bytearray, offset: int, size: int, value: int) -> None:
    if 0 <= offset and offset + size <= len(data):
        data[offset:offset + size] = value.to_bytes(size, "little")


def mutate_field(rng: random.Random, seed: Seed, data: bytearray, target: Field | None = None) -> str:
    f = target or rng.choice(seed.fields)
    old = int.from_bytes(data[f.offset:f.offset + f.size], "little")
    _put(data, f.offset, f.size, _edge(rng, old, f.size, len(data)))
    return f.name


def mutate_region(rng: random.Random, seed: Seed, data: bytearray, target: Region | None = None) -> str:
    r = target or rng.choice(seed.regions)
    for _ in range(rng.choice((1, 1, 2, 4))):
        size = rng.choice((1, 2, 4, 4, 8))
        at = r.offset + (rng.randrange(max(r.size - size + 1, 1)) & ~(size - 1 if size > 1 else 0))
        if rng.random() < 0.3 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        else:
            old = int.from_bytes(data[at:at + size], "little")
            _put(data, at, size, _edge(rng, old, size, len(data)))
    return f"content.{r.name}"


def truncate(rng: random.Random, seed: Seed, data: bytearray) -> str:
    cut = rng.choice(seed.boundaries + [rng.randrange(len(data) + 1)])
    del data[max(cut, 0):]
    return "truncate"


def flip(rng: random.Random, seed: Seed, data: bytearray) -> str:
    for _ in range(rng.randrange(1, 9) if data else 0):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return "flip"


def splice(rng: random.Random, seed: Seed, data: bytearray) -> str:
    source, dest = rng.choice(seed.regions), rng.choice(seed.regions)
    length = min(source.size, dest.size, rng.choice((8, 40, 64, 256)))
    data[dest.offset:dest.offset + length] = data[source.offset:source.offset + length]
    return f"splice.{source.name}>{dest.name}"


MUTATORS: tuple[tuple[Callable[[random.Random, Seed, bytearray], str], int], ...] = (
    (mutate_field, 40), (mutate_region, 30), (truncate, 10), (flip, 12), (splice, 8))


@dataclass(frozen=True)
class Mutant:
    seed: str
    what: tuple[str, ...]
    data: bytes
    command: tuple[str, ...]


def make_mutants(seeds: list[Seed], count: int, rng_seed: int) -> Iterator[Mutant]:
    """``count`` mutants, made as they are needed; the first ones visit every field and region of every seed
    once, the rest are random."""
    rng = random.Random(rng_seed)
    planned: list[tuple[Seed, Field | Region]] = [(s, t) for s in seeds for t in (*s.fields, *s.regions)]
    rng.shuffle(planned)
    mutators, weights = zip(*MUTATORS)
    for index in range(count):
        if index < len(planned):
            seed, target = planned[index]
            data = bytearray(seed.data)
            what = [mutate_field(rng, seed, data, target) if isinstance(target, Field)
                    else mutate_region(rng, seed, data, target)]
        else:
            seed = rng.choice(seeds)
            data = bytearray(seed.data)
            what = [rng.choices(mutators, weights)[0](rng, seed, data) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        yield Mutant(seed.name, tuple(what), bytes(data), COMMANDS[index % len(COMMANDS)])


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def check(outcome: Outcome) -> str | None:
    """Why an outcome breaks the contract, or None."""
    if outcome.code == 0:
        return None if outcome.stderr == "" else f"exit 0 with stderr {outcome.stderr[:300]!r}"
    if outcome.code == 2:
        lines = outcome.stderr.splitlines()
        if len(lines) == 1 and lines[0].startswith("hotpatch: error: ") and outcome.stderr.endswith("\n"):
            return None
        return f"exit 2 with stderr {outcome.stderr[:300]!r}"
    return f"exit {outcome.code} with stderr {outcome.stderr[-600:]!r}"


class InProcess:
    """Runs ``cli.main`` with sys.stdout/sys.stderr captured, and file descriptors 1 and 2 sent to files
    whose growth is checked after each case (output from C code bypasses sys.stderr)."""

    def __init__(self, work: Path) -> None:
        from hotpatch.cli import commands as cli

        self.main = cli.main
        self.fd_out = open(work / "fd1", "w+b")  # noqa: SIM115 - closed in close()
        self.fd_err = open(work / "fd2", "w+b")  # noqa: SIM115
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.fd_out.fileno(), 1)
        os.dup2(self.fd_err.fileno(), 2)

    def run(self, argv: list[str]) -> Outcome:
        out, err = io.StringIO(), io.StringIO()
        before = os.fstat(2).st_size
        started = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = self.main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - anything escaping main() is the finding
                import traceback

                err.write("".join(traceback.format_exception(exc)))
                code = 99
        seconds = time.perf_counter() - started
        raw = os.fstat(2).st_size - before
        if raw:
            self.fd_err.seek(before)
            err.write(self.fd_err.read(raw).decode(errors="replace"))
        return Outcome(code, out.getvalue(), err.getvalue(), seconds)

    def close(self) -> None:
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.fd_out.close()
        self.fd_err.close()


def run_subprocess(argv: list[str], limit_mb: int) -> Outcome:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hotpatch.cli", *argv], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit, cwd=ROOT)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    mutated: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    subprocess_cases: int = 0
    fields_total: int = 0

    def to_json(self) -> dict[str, object]:
        return {"cases": self.cases, "outcomes": dict(self.outcomes), "failures": self.failures[:20],
                "failure_count": len(self.failures), "slowest_case_s": round(self.slowest, 3),
                "seconds": round(self.seconds, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "subprocess_cases": self.subprocess_cases, "kinds_mutated": len(self.mutated),
                "fields_total": self.fields_total}


def run(mutants: Iterable[Mutant], count: int, work: Path, subprocess_sample: int, limit_mb: int) -> Report:
    report = Report()
    path = work / "mutant.dll"
    step = max(count // max(subprocess_sample, 1), 1)
    sample: list[tuple[int, Mutant]] = []
    runner = InProcess(work)
    started = time.monotonic()
    try:
        for index, mutant in enumerate(mutants):
            if index % step == 0 and len(sample) < subprocess_sample:
                sample.append((index, mutant))
            path.write_bytes(mutant.data)
            outcome = runner.run([*mutant.command, str(path)])
            report.cases += 1
            report.outcomes[f"exit {outcome.code}"] += 1
            report.mutated.update(mutant.what)
            report.slowest = max(report.slowest, outcome.seconds)
            problem = check(outcome)
            if problem is None and outcome.seconds > SLOW_CASE_SECONDS:
                problem = f"took {outcome.seconds:.1f} s"
            if problem:
                kept = work / f"failure-{index}.dll"
                kept.write_bytes(mutant.data)
                report.failures.append(f"case {index} {mutant.seed} {'+'.join(mutant.what)} "
                                       f"{' '.join(mutant.command)} (kept as {kept.name}): {problem}")
    finally:
        runner.close()
    for index, mutant in sample:
        path.write_bytes(mutant.data)
        outcome = run_subprocess([*mutant.command, str(path)], limit_mb)
        report.subprocess_cases += 1
        problem = check(outcome)
        if problem:
            report.failures.append(f"subprocess case {index} {mutant.seed} {'+'.join(mutant.what)}: {problem}")
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report
