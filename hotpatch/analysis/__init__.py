"""Function discovery and the analysis core: decoded instructions, references, fingerprints.

The compiled core (``_core.pyx`` over ``_decode.pyx`` and ``_reflist.pyx``) and its pure-Python twin
(``_reference.py``) agree exactly, and so do discovery's kernels (``_discovery.pyx``,
``_discovery_reference.py``); ``api`` picks one. May import ``pe`` and the shared leaves.
"""
