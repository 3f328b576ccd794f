"""The pieces of the emulated Windows process behind ``hotpatch.apply.emulator``.

- ``space``: the address space (allocations, page protections, VirtualQuery answers);
- ``heap``: the C heap that malloc/free and friends allocate from;
- ``modeldll``: export-only DLL images that stand in for system DLLs;
- ``models``: the registry of import models, by DLL family; ``crt``, ``jumps`` (setjmp/longjmp), ``stdio``,
  ``win32`` and ``winsock`` (ws2_32) hold the models;
- ``unwind``: x64 unwind info and the virtual unwinder;
- ``seh``: exception dispatch and unwinding (RaiseException, RtlUnwindEx, __C_specific_handler);
- ``machine``: the Unicorn CPU, the thread state (TEB, PEB, stack) and calls into guest code;
- ``loader``: mapping PE images like the Windows loader.
"""

from __future__ import annotations
