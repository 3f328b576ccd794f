"""Live patching of running processes: the transaction engine and its backends (the native agent, the emulator)."""

from __future__ import annotations
