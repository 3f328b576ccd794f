"""Live patching of running processes: the engine (engine, transaction, allocation, results, recovery),
its journal, and the backends it drives (the native agent under Wine, the emulator)."""

from __future__ import annotations
