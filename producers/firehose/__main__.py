"""``python -m producers.firehose``: the same as ``backfill firehose``."""

import sys

from runtime.commands.cli import main

# Guarded: --workers spawns processes that re-import the main module.
if __name__ == "__main__":
    sys.exit(main(["firehose", *sys.argv[1:]], own_process=True))
