"""The PostgreSQL sink: typed tables, exactly-once batches, deletes, and the ``consume postgres`` CLI.

Modules: :mod:`.rows` (pure transform of events into rows), :mod:`.schema` (versioned migrations),
:mod:`.sink` (COPY + upsert transactions with the offsets), :mod:`.app` (the command line).
"""

from consumers.postgres.app import add_arguments, main
from consumers.postgres.sink import PostgresSettings, PostgresSink

__all__ = ["PostgresSettings", "PostgresSink", "add_arguments", "main"]
