"""The simulators: local servers that speak the network's protocols byte for byte (Jetstream's
websocket, the relay firehose, PDS hosts' XRPC, the PLC directory), with faults on demand, for the
demo, the tests, the benchmarks and users' own experiments (``backfill simulate ...``).

A tool, not a dependency: it may import :mod:`runtime.atproto` (to write real bytes),
:mod:`runtime.contract` and :mod:`runtime.process`; only :mod:`runtime.commands` (the demo), the
tests and the benchmarks import it, never a producer or consumer.
"""
