"""``python -m producers.repos``: the same as ``backfill repos``."""

import sys

from runtime.commands.cli import main

sys.exit(main(["repos", *sys.argv[1:]], own_process=True))
