"""Facts of a Windows process shared by the live backends (``apply``) and the emulated one
(``emulation``): Win32 memory constants, running programs under Wine.

May import only the shared leaves.
"""
