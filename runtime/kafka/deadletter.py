"""Dead letters: bad input kept with its reason and origin in a dead-letter topic.

Each reason is logged once per process with its context (later ones are only counted), so a storm
of bad input does not flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from runtime.contract.codec import AvroCodec
from runtime.process.metrics import Metrics

log = logging.getLogger(__name__)


class DeadLetters:
    """Writes dead-letter records through a produce function.

    Args:
        produce: ``produce(topic, key, value)`` (the caller's producer, so dead letters share its
            transaction and delivery guarantees).
        codec: encodes the ``dead_letter`` schema.
        metrics: counts ``atproto_backfill_dlq_messages_total{stage, reason}``.
        stage: ``producer:<source>`` or ``consumer:<sink>``.
    """

    def __init__(self, produce: Callable[[str, bytes | None, bytes], None], codec: AvroCodec,
                 metrics: Metrics, stage: str, wall: Callable[[], float] = time.time) -> None:
        self._produce = produce
        self._codec = codec
        self._metrics = metrics
        self._stage = stage
        self._wall = wall
        self._logged: set[str] = set()
        self.count = 0

    def send(self, topic: str, *, reason: str, detail: str, payload: bytes, origin: str,
             did: str | None = None, cursor: int | None = None, src_topic: str | None = None,
             partition: int | None = None, offset: int | None = None) -> None:
        """Dead-letter one input to ``topic``."""
        datum: dict[str, Any] = {
            "reason": reason, "detail": detail[:2000], "stage": self._stage, "origin": origin,
            "topic": src_topic, "partition": partition, "offset": offset, "did": did, "cursor": cursor,
            "time_us": int(self._wall() * 1e6), "payload": bytes(payload),
        }
        value = self._codec.encode("dead_letter", topic, datum)
        self._produce(topic, (did or origin).encode(), value)
        self._metrics.dead_letters.inc(self._stage, reason)
        self.count += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("dead-lettered input to %s (reason %s, origin %s, did %s): %s; "
                        "further %s drops are only counted", topic, reason, origin, did, detail[:500], reason)
