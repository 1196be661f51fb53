"""``python -m producers.jetstream``: the same as ``backfill jetstream``."""

import sys

from runtime.commands.cli import main

sys.exit(main(["jetstream", *sys.argv[1:]], own_process=True))
