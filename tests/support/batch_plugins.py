"""Analysis caches plugged into batch job processes by the tests (``CacheSpec("tests.support.batch_plugins:...")``)."""

from __future__ import annotations

import os
from pathlib import Path

from hotpatch.analysis.functions import FunctionTable
from hotpatch.batch import MemoryCache


class CrashingCache(MemoryCache):
    """Aborts the job process (a real SIGABRT, as a fault in a compiled library would) on one file name."""

    def __init__(self, fatal_name: str) -> None:
        super().__init__()
        self.fatal_name = fatal_name

    def table(self, source: str) -> FunctionTable:
        if Path(source).name == self.fatal_name:
            os.abort()
        return super().table(source)


class CountingCache(MemoryCache):
    """Counts the tables it really analysed in a file of its directory, one line per analysis."""

    def __init__(self, directory: str) -> None:
        super().__init__(entries=8)
        self.log = Path(directory) / f"analysed-{os.getpid()}.txt"

    def table(self, source: str) -> FunctionTable:
        hits = self.hits
        table = super().table(source)
        if self.hits == hits:
            with open(self.log, "a") as handle:
                handle.write(source + "\n")
        return table
