"""The PE format: reading PE32+ x86-64 headers and directories, from a file or a process's memory.

``headers`` is the one reader of the DOS, COFF and optional headers and the section table, over a
``read(offset, size)`` callable, so the same code serves a file's bytes, a mapped image and the
memory of a running process. ``directories`` reads the data directories discovery needs (exports,
imports, base relocations, .pdata with unwind info, COFF symbols, TLS, load config) from the file's
bytes without LIEF, whose native module costs more to import than most commands cost to run.
Imports nothing from the rest of hotpatch but ``errors`` and ``names``.
"""
