"""The relay firehose producer: ``com.atproto.sync.subscribeRepos`` frames into the typed topics.

* :mod:`~producers.firehose.decode` -- pure frame decoding into typed events.
* :mod:`~producers.firehose.verify` -- commit signatures and Sync 1.1 MST proofs (``--verify``).
* :mod:`~producers.firehose.source` -- the websocket source: cursor, reconnects, gaps, watermark.
* :mod:`~producers.firehose.workers` -- ``--workers N``: DID-sharded decode/produce processes.
* :mod:`~producers.firehose.app` -- ``backfill firehose``; :mod:`~producers.firehose.inspect` --
  ``backfill inspect frames``.
"""
