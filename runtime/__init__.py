"""Shared runtime of atproto-backfill: settings, Kafka, Avro codec, topics, checkpoints, metrics, simulators.

Producers (``producers/``) and consumers (``consumers/``) agree only through the Avro schemas in
``schemas/`` and the collection-to-topic mapping in :mod:`runtime.contract.topics`.
"""

__version__ = "0.1.0"
