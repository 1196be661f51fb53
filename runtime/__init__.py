"""Shared runtime of atproto-backfill, which the producers and consumers stand on and which
imports neither of them. One package per concept, from the bottom up:

* :mod:`runtime.errors` -- the exception tree every package raises.
* :mod:`runtime.atproto` -- the AT Protocol formats: DAG-CBOR, CID, CAR, MST, commits, keys, captures.
* :mod:`runtime.contract` -- the contract between producers and consumers: typed events, Avro
  schemas and codec, the collection-to-topic-and-key map, the fold rule.
* :mod:`runtime.process` -- process plumbing: options, metrics, logging, progress, signals, plugins.
* :mod:`runtime.kafka` -- Kafka plumbing: client settings, admin, the embedded broker, job
  checkpoints, dead letters, stored offsets.
* :mod:`runtime.simulator` -- local servers that speak the network's protocols (a tool).
* :mod:`runtime.commands` -- the ``backfill`` dispatcher and the commands of neither side.

Each package's docstring says what it may import; ``tests/unit/test_layout.py`` checks it.
"""

__version__ = "0.1.0"
