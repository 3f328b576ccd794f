"""Function discovery and the analysis core: decoded instructions, references, fingerprints.

The compiled core (``_core.pyx``) and its pure-Python twin (``_reference.py``) agree
exactly; ``api`` picks one. May import ``pe`` and the shared leaves.
"""
