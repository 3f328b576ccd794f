"""hotpatch.pe: one header reader over files and memory, and a directory reader equal to LIEF's."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from hotpatch.diff.compare import diff
from hotpatch.errors import CorruptImageError, NotPEError, TruncatedImageError
from hotpatch.pe.headers import DIRECTORY_EXPORT, read_file_headers, read_headers
from hotpatch.pe.image import Image
from tests.support.realbins import SELF_DIFF_SWEEP, real_binary


def _assert_same_image(path: Path) -> None:
    lief_image, fast = Image.load(path), Image.load_fast(path)
    for field in dataclasses.fields(Image):
        assert getattr(fast, field.name) == getattr(lief_image, field.name), f"{path.name}: {field.name} differs"


def test_fast_loader_reads_every_fixture_as_lief_does(built_fixtures: Path) -> None:
    # the fixtures' own images (a Wine prefix may live under the same directory)
    images = sorted(built_fixtures.glob("*/*.dll")) + sorted(built_fixtures.glob("*/*.exe")) \
        + sorted(built_fixtures.glob("*.exe"))
    assert len(images) > 50
    for path in images:
        _assert_same_image(path)


@pytest.mark.realbins
@pytest.mark.parametrize("toolchain", ["gcc", "msvc", "llvm"])
def test_fast_loader_reads_real_binaries_as_lief_does(toolchain: str) -> None:
    # a few of each toolchain's sweep binaries: MSVC's chained unwind info and load config, mingw's COFF symbols
    picked = [entry for entry in SELF_DIFF_SWEEP if entry[3] == toolchain][-4:]
    for name, version, pattern, _ in picked:
        _assert_same_image(real_binary(name, version, pattern))


def test_fast_loader_reads_rust_pyd_as_lief_does(rust_pyd: Path) -> None:
    _assert_same_image(rust_pyd)  # 21,000 .pdata entries with chains, 140 imports


#: every real pair diffed by path in the tests and benchmarks (the diff reads paths with the fast reader)
DIFFED_PAIRS = (
    ("cryptography", "43.0.0", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy.libs/libscipy_openblas64_-*.dll"),
    ("numpy", "2.1.0", "2.1.1", "numpy/_core/_multiarray_umath.*.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy/_core/_simd.*.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy/random/_generator.*.pyd"),
    ("pyzmq", "26.0.2", "26.0.3", "zmq/backend/cython/_zmq.*.pyd"),
    ("duckdb", "1.1.0", "1.1.1", "duckdb/duckdb.cp311-win_amd64.pyd"),
)


@pytest.mark.realbins
@pytest.mark.parametrize("dist,old,new,pattern", DIFFED_PAIRS, ids=[p[3].split("/")[-1] for p in DIFFED_PAIRS])
def test_fast_loader_reads_the_diffed_real_pairs_as_lief_does(dist: str, old: str, new: str, pattern: str) -> None:
    for version in (old, new):
        _assert_same_image(real_binary(dist, version, pattern))


def test_diff_reads_paths_without_lief(built_fixtures: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cls: type, source: object) -> Image:
        raise AssertionError(f"the diff read {source} with LIEF")

    case = built_fixtures / "body_change"
    expected = diff(Image.load(case / "baseline.dll"), Image.load(case / "patched.dll")).to_json()
    monkeypatch.setattr(Image, "load", classmethod(refuse))
    assert diff(case / "baseline.dll", case / "patched.dll").to_json() == expected


def test_headers_read_from_memory_match_the_file(built_fixtures: Path) -> None:
    path = built_fixtures / "body_change" / "baseline.dll"
    data = path.read_bytes()
    image = Image.load_fast(path)
    from_file = read_file_headers(data, path.name)
    # a process's memory: the image as mapped, read through a callable in small pieces
    from_memory = read_headers(lambda offset, size: image.memory[offset:offset + size], "mapped")
    assert from_memory == from_file
    assert from_file.image_base == image.image_base and from_file.entry_rva == image.entry_rva
    assert [(s.name, s.rva) for s in from_file.sections] == [(s.name, s.rva) for s in image.sections]


def test_header_reader_names_what_is_wrong() -> None:
    with pytest.raises(NotPEError):
        read_file_headers(b"ZM" + bytes(200), "x")
    with pytest.raises(TruncatedImageError):
        read_file_headers(b"MZ" + bytes(20), "x")
    with pytest.raises(TruncatedImageError, match="past the end"):
        read_file_headers(b"MZ" + bytes(0x3A) + struct.pack("<I", 0x1000), "x")


def test_fast_loader_refuses_a_broken_export_directory_in_one_line(built_fixtures: Path, tmp_path: Path) -> None:
    path = built_fixtures / "body_change" / "baseline.dll"
    data = bytearray(path.read_bytes())
    headers = read_file_headers(bytes(data), path.name)
    export_rva, _ = headers.directory(DIRECTORY_EXPORT)
    assert export_rva
    section = next(s for s in headers.sections if s.rva <= export_rva < s.rva + s.virtual_size)
    at = section.raw_offset + export_rva - section.rva
    struct.pack_into("<I", data, at + 28, 0x7FFFFFF0)  # AddressOfFunctions far outside the image
    broken = tmp_path / "broken.dll"
    broken.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError) as caught:
        Image.load_fast(broken)
    assert "\n" not in str(caught.value)


def test_fast_loader_reads_wine_system_dlls_as_lief_does(wine_prefix: Path) -> None:
    # Wine's kernel32 forwards many exports to ntdll and kernelbase: LIEF gives a forwarder RVA 0
    system32 = wine_prefix / "drive_c" / "windows" / "system32"
    kernel32 = Image.load_fast(system32 / "kernel32.dll")
    assert any(export.forwarder for export in kernel32.exports)
    for name in ("kernel32.dll", "ucrtbase.dll"):
        _assert_same_image(system32 / name)


def test_mapped_image_is_laid_out_as_the_loader_does(built_fixtures: Path, rust_pyd: Path) -> None:
    """``_mapped`` joins the file's sections in one copy; ``_mapped_in_place`` is the plain way (a zeroed
    image, each section written at its RVA) and both loaders' memory comes from the first."""
    from hotpatch.pe.image import _check_headers, _mapped, _mapped_in_place

    paths = sorted(built_fixtures.glob("*/*.dll"))[:20] + [rust_pyd]
    for path in paths:
        data = path.read_bytes()
        headers = _check_headers(data, path.name)
        memory = _mapped(data, headers)
        assert type(memory) is bytes and memory == _mapped_in_place(data, headers), path
        assert len(memory) == headers.size_of_image
    # a section over the headers (no linker makes one, nothing refuses it): written over them, as in place
    head = headers.pe.size_of_headers
    first = headers.sections[0]
    moved = dataclasses.replace(first, rva=head // 2, virtual_size=min(first.virtual_size, head))
    odd = dataclasses.replace(headers, sections=(moved,) + headers.sections[1:])
    assert _mapped(data, odd) == _mapped_in_place(data, odd) != _mapped(data, headers)


def test_fast_loader_builds_pe_objects_as_their_constructors_do(rust_pyd: Path) -> None:
    """``unwind_info`` and ``fold_chains`` fill the slots directly; the fast reader reads each UNWIND_INFO once
    and shares it between the functions that point at it (MSVC's alike prologs), as equal as LIEF's copies."""
    import pickle

    from hotpatch.pe.image import RuntimeFunction, UnwindInfo, _runtime_function, unwind_info

    values = (0x3000, 1, 3, 8, 4, 5, 0, 0x4000)
    made, direct = UnwindInfo(*values), unwind_info(*values)
    assert direct == made and hash(direct) == hash(made) and repr(direct) == repr(made)
    assert pickle.loads(pickle.dumps(direct)) == made and not hasattr(direct, "__dict__")
    for extra in ((), (((0x2000, 0x2010),), (0x3100,))):
        function = RuntimeFunction(0x1000, 0x1040, made, *extra)
        built = _runtime_function(0x1000, 0x1040, direct, *extra)
        assert built == function and hash(built) == hash(function) and repr(built) == repr(function)
    with pytest.raises(dataclasses.FrozenInstanceError):
        direct.rva = 0  # type: ignore[misc]
    functions = Image.load_fast(rust_pyd).runtime_functions
    by_rva = {f.unwind.rva for f in functions}
    assert len({id(f.unwind) for f in functions}) == len(by_rva) < len(functions)
    assert functions == Image.load(rust_pyd).runtime_functions


def _runtime_functions_by_loop(reader: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """``runtime_functions`` read by the Python loop alone (the compiled pass's twin), or the error it raises."""
    from hotpatch.pe import directories

    with monkeypatch.context() as patched:
        patched.setattr(directories, "read_pdata", lambda *args: None)
        try:
            return reader.runtime_functions()  # type: ignore[attr-defined]
        except CorruptImageError as exc:
            return str(exc)


def test_compiled_pdata_pass_equals_the_loop_on_real_tables(built_fixtures: Path, rust_pyd: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hotpatch.pe._pdata import read_pdata

    from hotpatch.pe import image as model
    from hotpatch.pe.directories import DirectoryReader
    from hotpatch.pe.headers import DIRECTORY_EXCEPTION

    taken = 0
    for path in [rust_pyd, *sorted(built_fixtures.glob("*/*.dll"))[:12]]:
        data = path.read_bytes()
        headers = model._check_headers(data, path.name)
        memory = model._mapped(data, headers)
        reader = DirectoryReader(memory, data, headers.pe, headers.sections, path.name, model)
        rva, size = headers.pe.directory(DIRECTORY_EXCEPTION)
        executable = [(s.rva, s.end_rva) for s in headers.sections if s.executable]
        table = memory[rva:rva + size - size % 12]
        taken += read_pdata(memory, table, executable, model.UnwindInfo, model.RuntimeFunction) is not None
        assert reader.runtime_functions() == _runtime_functions_by_loop(reader, monkeypatch), path
    assert taken >= 10  # the compiled pass read them, not the loop


def test_compiled_pdata_pass_equals_the_loop_on_random_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random .pdata over random unwind info: roots with and without handlers, chains of any length (cycles
    too), tails and links cut by the image end, empty entries and entries outside code. Wherever the compiled
    pass takes a table, the loop reads the same; where it gives up, the loop's answer (or error) stands."""
    import random
    from types import SimpleNamespace

    from hotpatch.pe._pdata import read_pdata

    from hotpatch.pe import image as model
    from hotpatch.pe.directories import DirectoryReader
    from hotpatch.pe.headers import DIRECTORY_EXCEPTION

    rng = random.Random(12)
    taken = chained = 0
    for round_ in range(400):
        size = 0x3000
        memory = bytearray(rng.randbytes(size))
        sections = (SimpleNamespace(rva=0x100, end_rva=0x1000, executable=True),
                    SimpleNamespace(rva=0x1000, end_rva=0x1800, executable=rng.random() < 0.5),
                    SimpleNamespace(rva=0x1800, end_rva=size, executable=False))
        # function starts the entries and the chained tails draw from, so that fragments find their roots
        starts = [rng.randrange(0x100, 0xF80) for _ in range(rng.randint(1, 30))]
        # unwind infos at the end of the image: a few dozen, each flags at random, chained ones to another
        infos = [rng.randrange(0x2000, size - (0 if rng.random() < 0.02 else 40)) for _ in range(rng.randint(1, 40))]
        for unwind_rva in infos:
            flags = rng.choice((0, 0, 1, 2, 3, 4, 4, 4))
            memory[unwind_rva] = (flags << 3) | 1
            if unwind_rva + 3 < size:
                memory[unwind_rva + 2] = rng.randrange(0, 6)
                codes = memory[unwind_rva + 2]
                tail = unwind_rva + 4 + 2 * (codes + (codes & 1))
                if flags & 4 and tail + 12 <= size:
                    struct.pack_into("<III", memory, tail, rng.choice(starts), 0, rng.choice(infos))
        entries = []
        for _ in range(rng.randint(1, 60)):
            begin = rng.choice(starts) if rng.random() < 0.98 else rng.randrange(0x1000, 0x1700)
            end = min(begin + rng.randrange(1, 0x80), 0x1000) if rng.random() < 0.99 else begin
            entries.append((begin, end, rng.choice(infos)))
        if round_ % 2:  # as MSVC writes it: sorted by begin, each once (the compiled pass keeps that order)
            entries = sorted({entry[0]: entry for entry in entries}.values())
        if rng.random() < 0.05:
            entries.insert(rng.randrange(len(entries) + 1), (0, 0, 0))
        table = b"".join(struct.pack("<III", *entry) for entry in entries)
        memory[0x1800:0x1800 + len(table)] = table
        image = bytes(memory)
        headers = SimpleNamespace(directory={DIRECTORY_EXCEPTION: (0x1800, len(table))}.__getitem__)
        reader = DirectoryReader(image, image, headers, sections, f"random{round_}", model)  # type: ignore[arg-type]
        executable = [(s.rva, s.end_rva) for s in sections if s.executable]
        compiled = read_pdata(image, table, executable, model.UnwindInfo, model.RuntimeFunction)
        if compiled is None:
            continue
        taken += 1
        chained += any(function.fragments for function in compiled)  # fragments that found their root
        assert compiled == _runtime_functions_by_loop(reader, monkeypatch), round_
    assert taken > 100 and chained > 50
