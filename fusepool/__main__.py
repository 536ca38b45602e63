"""``python -m fusepool``: the same entry point as the ``fusepool`` command."""

import sys

from fusepool.cli import main

sys.exit(main())
