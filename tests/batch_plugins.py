"""Analysis caches plugged into batch job processes by the tests (``CacheSpec("tests.batch_plugins:...")``)."""

from __future__ import annotations

import os
from pathlib import Path

from hotpatch.batch import MemoryCache
from hotpatch.functions import FunctionTable


class CrashingCache(MemoryCache):
    """Aborts the job process (a real SIGABRT, as a fault in a compiled library would) on one file name."""

    def __init__(self, fatal_name: str) -> None:
        super().__init__()
        self.fatal_name = fatal_name

    def load(self, path: str) -> FunctionTable:
        if Path(path).name == self.fatal_name:
            os.abort()
        return super().load(path)


class CountingCache(MemoryCache):
    """Counts the tables it really analysed in a file of its directory, one line per analysis."""

    def __init__(self, directory: str) -> None:
        super().__init__(entries=8)
        self.log = Path(directory) / f"analysed-{os.getpid()}.txt"

    def load(self, path: str) -> FunctionTable:
        hits = self.hits
        table = super().load(path)
        if self.hits == hits:
            with open(self.log, "a") as handle:
                handle.write(path + "\n")
        return table
