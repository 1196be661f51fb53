"""``python -m consumers.postgres``: the same as ``backfill consume postgres``."""

import sys

from runtime.commands.cli import main as cli_main

sys.exit(cli_main(["consume", "postgres", *sys.argv[1:]], own_process=True))
