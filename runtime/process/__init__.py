"""Process plumbing every command shares: options from flags and environment, metrics, logging,
progress display, signal handling and giving freed heap memory back.

May import :mod:`runtime.errors` and :mod:`runtime.contract` (metric label sets come from the
contract); never Kafka, the simulators or the commands.
"""
