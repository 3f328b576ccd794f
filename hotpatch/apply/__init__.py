"""Live patching of running processes: backends (the native agent, later the emulator)."""

from __future__ import annotations
