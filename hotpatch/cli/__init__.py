"""Every command's argparse wiring and the ``hotpatch`` entry point (``main``); the demo.

May import every stage: the command line sits on top of them all.
"""
