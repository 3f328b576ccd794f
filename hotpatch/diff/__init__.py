"""Matching two images' functions and comparing code and data, into one ``DiffResult``.

Kernels (``_diffcore.pyx``) and their pure twin (``_diffreference.py``). May import
``analysis``, ``pe`` and the shared leaves; never ``verdict``.
"""
