"""``python -m hotpatch.cli``: the ``hotpatch`` command."""

import sys

from .commands import main

if __name__ == "__main__":  # walk_packages imports every module, this one included
    sys.exit(main())
