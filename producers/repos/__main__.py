"""``python -m producers.repos``: the same as ``backfill repos``."""

import sys

from runtime.cli import main

sys.exit(main(["repos", *sys.argv[1:]]))
