"""``python -m runtime`` is ``backfill``."""

import sys

from runtime.commands.cli import main

sys.exit(main())
