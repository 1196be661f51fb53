"""The Jetstream producer: ``backfill jetstream`` / ``python -m producers.jetstream``.

``decode`` turns messages into typed events (pure), ``source`` reads the websocket, ``app`` wires
the job, the optional queue consumer and the seed's statistics.
"""

from producers.jetstream.app import run_backfill_sync

__all__ = ["run_backfill_sync"]
