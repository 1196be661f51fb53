"""Kafka plumbing: client settings, admin helpers, the embedded broker, job checkpoints in the
control topic, dead letters and stored consumer offsets.

May import :mod:`runtime.errors`, :mod:`runtime.contract` and :mod:`runtime.process`.
"""
