"""What a producer may run alongside itself in the same process: a *companion*.

Seed 000's combined mode: ``backfill jetstream`` alone fills a queue, because a queue consumer runs
beside the producer. The producer does not know which consumer that is; it loads a companion factory
by name from the ``atproto_backfill.companions`` entry points (:mod:`runtime.process.plugins`) and
drives it through :class:`Companion`, so ``producers/`` never imports ``consumers/``.

The life of a companion::

    companion = factory(queue_name=..., queue_path=..., collections=..., batch_size=...)
    companion.start(kafka, metrics)     # consumes in the background
    ... companion.stored ...            # progress while the producer runs
    companion.finish(final.offsets)     # consume up to the producer's final offsets, then wait
    companion.stored, companion.queue_length()
    companion.close()
    # or, when the producer failed: companion.abort()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics


@runtime_checkable
class Companion(Protocol):
    """A consumer run in the producer's process, started with it and finished at its final offsets."""

    @property
    def stored(self) -> int:
        """Items it stored so far (the progress display's ``stored``; the statistics' ``records_stored``)."""
        ...

    def start(self, kafka: KafkaSettings, metrics: Metrics) -> None:
        """Start consuming in the background from the cluster of ``kafka``, counting into ``metrics``."""
        ...

    def finish(self, offsets: Mapping[str, Mapping[str, int]]) -> None:
        """Consume up to ``offsets`` (topic -> partition as a string -> next offset) and wait until done.

        Raises:
            BaseException: whatever stopped the background consumer, re-raised here.
        """
        ...

    def abort(self) -> None:
        """Tell the background consumer to stop soon (the producer failed); does not wait."""
        ...

    def queue_length(self) -> int:
        """Items waiting in what it fills (the statistics' ``queue_length``)."""
        ...

    def close(self) -> None:
        """Release what it holds (after :meth:`finish`)."""
        ...


class CompanionFactory(Protocol):
    """Builds a companion from the producer's settings (an ``atproto_backfill.companions`` entry point)."""

    def __call__(self, *, queue_name: str, queue_path: Path | None, collections: Sequence[str],
                 batch_size: int) -> Companion:
        """A companion filling ``queue_name`` in ``queue_path`` (None: its default) with ``collections``'
        events, ``batch_size`` per transaction."""
        ...
