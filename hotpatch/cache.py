"""On-disk cache of image analyses: function discovery and the analysis core, per image.

A release train diffs the baseline of a cycle against every later release,
and a batch may meet the same image in many jobs; analysing an image is the
expensive part of a diff, so its result is kept on disk::

    cache = AnalysisCache()                    # ~/.cache/hotpatch/analysis, 2 GiB
    table = cache.table("core.dll")            # a FunctionTable, from disk or fresh
    result = hotpatch.diff.compare.diff(cache.table(a), cache.table(b))
    cache.stats.analyses, cache.stats.hits     # what it cost

Key: SHA-256 over the analysis version (``analysis_version()``: hotpatch's
version, the analysis implementation and the bytes of the sources and compiled
core that decide an analysis), the file's SHA-256 and the code SHA-256 of the
image. The code hash alone would not do: discovery also reads .pdata,
exports, relocations and COFF symbols, which live outside the code.

An entry is one file, ``<key>.hpa``: a magic line, the key, the SHA-256 and
length of the payload, then the payload (a pickle of the functions and their
analyses). The key and the payload hash are checked before anything is
unpickled; an entry that does not match is counted as rejected, deleted and
rebuilt. pickle runs only on files in a directory that belongs to the user
and nobody else may open (0700): that, not the hash, is what keeps a hostile
writer out. Entries are written to a temporary file and renamed, so a reader
never sees half an entry. Above ``max_bytes`` the least recently used entries
(by modification time, touched on every hit) are removed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import struct
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from . import __version__
from .analysis.api import AnalysisContext, backend
from .analysis.functions import FunctionTable, discover
from .collector import gc_paused
from .errors import CacheError
from .pe.image import Image

__all__ = ["DEFAULT_MAX_BYTES", "AnalysisCache", "CacheStats", "analysis_version", "default_cache_dir"]

DEFAULT_MAX_BYTES = 2 << 30
_MAGIC = b"hotpatch.analysis/1\n"
_HEADER = struct.Struct("<32s32sQ")  # key, payload SHA-256, payload length
#: the sources whose text decides what an analysis holds (with the compiled core's own file)
_ANALYSIS_SOURCES = ("pe/image.py", "analysis/functions.py", "analysis/layout.py", "analysis/api.py",
                     "analysis/refkinds.py", "analysis/padding.py", "analysis/flow.py", "analysis/_reference.py",
                     "analysis/_discovery_reference.py", "analysis/_core.pyx", "analysis/_decode.pyx",
                     "analysis/_reflist.pyx", "analysis/_discovery.pyx", "analysis/_shared.pxd",
                     "analysis/_buffers.pxd", "analysis/_refkinds.pxd")


@dataclass
class CacheStats:
    """What a cache did: ``analyses`` images analysed afresh, ``hits`` taken from disk."""

    hits: int = 0
    analyses: int = 0
    stored: int = 0
    rejected: int = 0
    evicted: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@cache
def analysis_version() -> str:
    """A digest of everything that decides an analysis; any change to it starts a new cache generation."""
    impl = backend()
    digest = hashlib.sha256(f"{__version__}\0{getattr(impl, 'IMPLEMENTATION', impl.__name__)}\0".encode())
    here = Path(__file__).resolve().parent
    for name in _ANALYSIS_SOURCES:
        path = here / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    compiled = getattr(impl, "__file__", None)
    if compiled:
        digest.update(Path(compiled).read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$HOTPATCH_ANALYSIS_CACHE``, else ``analysis/`` under ``$HOTPATCH_CACHE`` or ``~/.cache/hotpatch``."""
    explicit = os.environ.get("HOTPATCH_ANALYSIS_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("HOTPATCH_CACHE") or Path.home() / ".cache" / "hotpatch"
    return Path(root) / "analysis"


class AnalysisCache:
    """Analyses of images by content; ``enabled=False`` analyses every time (``--no-cache``)."""

    def __init__(self, directory: str | Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 enabled: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.max_bytes = max_bytes
        self.enabled = enabled
        self.stats = CacheStats()
        self._checked = False

    # ── the one verb ───────────────────────────────────────────────────────

    def table(self, source: str | Path) -> FunctionTable:
        """The analysed functions of the image at ``source``, from the cache when it holds them."""
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CacheError(f"{path}: cannot read: {exc.strerror}") from None
        image = Image.load(path)
        if not self.enabled:
            self.stats.analyses += 1
            return discover(image)
        key = self.key(image, hashlib.sha256(data).digest())
        found = self._read(key)
        if found is not None:
            functions, analyses = found
            self.stats.hits += 1
            return FunctionTable(image, functions, analyses, AnalysisContext.from_image(image), backend())
        table = discover(image)
        self.stats.analyses += 1
        with gc_paused():  # millions of small tuples, no cycles: a collection would walk them all
            payload = pickle.dumps((table.functions, table.analyses), protocol=pickle.HIGHEST_PROTOCOL)
        self._write(key, payload)
        return table

    @staticmethod
    def key(image: Image, file_sha256: bytes) -> bytes:
        return hashlib.sha256(b"\0".join((analysis_version().encode(), file_sha256,
                                          image.identity.code_sha256.encode()))).digest()

    def check(self) -> None:
        """Make sure the cache can be used (a private directory), before any work that depends on it."""
        if self.enabled:
            self._private_dir()

    def size(self) -> int:
        """Bytes the entries take on disk."""
        return sum(size for _, size, _ in self._entries())

    def clear(self) -> None:
        for path, _, _ in self._entries():
            path.unlink(missing_ok=True)
        for path in self.directory.glob(".*.part") if self.directory.is_dir() else ():
            path.unlink(missing_ok=True)

    # ── entries ─────────────────────────────────────────────────────────────

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}.hpa"

    def _private_dir(self) -> Path:
        """The cache directory, made 0700 if new; refused if anyone else could write or read it."""
        if not self._checked:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                info = self.directory.stat()
            except OSError as exc:
                raise CacheError(f"analysis cache {self.directory}: {exc.strerror}") from None
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise CacheError(f"analysis cache {self.directory} must belong to you with mode 0700 "
                                 f"(found uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); "
                                 "fix it or run without the cache")
            self._checked = True
        return self.directory

    def _read(self, key: bytes) -> tuple[Any, Any] | None:
        self._private_dir()
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return self._reject(path)
        head = len(_MAGIC) + _HEADER.size
        if len(blob) < head or not blob.startswith(_MAGIC):
            return self._reject(path)
        stored_key, digest, length = _HEADER.unpack_from(blob, len(_MAGIC))
        payload = memoryview(blob)[head:]
        if stored_key != key or length != len(payload) or hashlib.sha256(payload).digest() != digest:
            return self._reject(path)
        try:
            with gc_paused():
                functions, analyses = pickle.loads(payload)
        except Exception:  # a verified payload of an older layout of the classes
            return self._reject(path)
        os.utime(path)  # least recently used goes first
        return functions, analyses

    def _reject(self, path: Path) -> None:
        self.stats.rejected += 1
        path.unlink(missing_ok=True)
        return None

    def _write(self, key: bytes, payload: bytes) -> None:
        directory = self._private_dir()
        header = _MAGIC + _HEADER.pack(key, hashlib.sha256(payload).digest(), len(payload))
        if len(header) + len(payload) > self.max_bytes:
            return  # never fits: keep the cache's other entries
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(header)
                handle.write(payload)
            os.replace(temp, self._path(key))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        self.stats.stored += 1
        self._evict(keep=self._path(key))

    def _entries(self) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of every entry, oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.glob("*.hpa"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            out.append((path, info.st_size, info.st_mtime_ns))
        return sorted(out, key=lambda entry: entry[2])

    def _evict(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.stats.evicted += 1
