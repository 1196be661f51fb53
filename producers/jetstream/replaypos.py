"""The resume position of a Jetstream v2 replay: (instance, seq), checkpointed with the job.

A v2 instance numbers its events with its own ``seq`` (from 1, never reused), and the replay
delivers rows in seq order, history and live tail alike. So everything delivered is exactly "every
wanted row with seq <= ``seq``": a resume plans again from ``afterSeq = seq`` and loses or repeats
nothing, mid-segment or not. The seq is only meaningful on the instance that assigned it; a
resume against another instance starts from the *time* of the last delivered row instead
(:meth:`ReplayPosition.restore`), through that instance's ``listSegments``.

Pure: no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from runtime.contract.records import Event
from runtime.errors import CursorRegressionError

#: The ``protocol`` value of a v2 position in the job checkpoint.
PROTOCOL: Final = "v2"


@dataclass(slots=True)
class ReplayPosition:
    """What a v2 replay delivered, and where it is in its plan.

    Attributes:
        instance: the base URL of the instance whose seqs these are.
        seq: the highest seq delivered (None: nothing yet).
        start_after: the exclusive seq a fresh run starts after (from ``--cursor``/``-s``), kept until
            something is delivered.
        start_time_us: a time to start from instead of a seq (a resume against another instance, or
            ``-s`` before the instance was asked); resolved by the source through ``listSegments``.
        witnessed_us: the ``witnessed_at`` (or event time) of the last delivered row.
        sealed_tip: the plan's pinned sealed tip ``S`` (status only).
        page_after: the ``afterSeq`` of the plan page being replayed (status only).
        live: True once the replay moved on to the live tail (status only).
    """

    instance: str
    seq: int | None = None
    start_after: int | None = None
    start_time_us: int | None = None
    witnessed_us: int | None = None
    sealed_tip: int | None = None
    page_after: int | None = None
    live: bool = False

    @property
    def cursor(self) -> int | None:
        """The headline cursor: the last delivered seq."""
        return self.seq

    @property
    def after(self) -> int | None:
        """The exclusive seq to continue after (None: a time or the instance's beginning decides)."""
        return self.seq if self.seq is not None else self.start_after

    def seen(self, event: Event) -> bool:
        """True for an event at or below the delivered seq (a replayed row)."""
        after = self.after
        return after is not None and event.cursor <= after

    def advance(self, event: Event) -> None:
        """Record ``event`` as delivered.

        Raises:
            CursorRegressionError: its seq is not above the last delivered one (the source must not
                yield it: rows come in seq order and replays are dropped before this).
        """
        seq = event.cursor
        if self.seq is not None and seq <= self.seq:
            raise CursorRegressionError(f"jetstream2 seq went from {self.seq} to {seq} on {self.instance}")
        self.seq = seq
        witnessed = getattr(event, "witnessed_at", None)
        self.witnessed_us = witnessed if isinstance(witnessed, int) and witnessed > 0 else event.time_us

    def snapshot(self) -> dict[str, Any]:
        """JSON state for the job checkpoint."""
        return {"protocol": PROTOCOL, "instance": self.instance, "seq": self.seq, "start_after": self.start_after,
                "start_time_us": self.start_time_us, "witnessed_us": self.witnessed_us,
                "sealed_tip": self.sealed_tip, "page_after": self.page_after, "live": self.live}

    @classmethod
    def restore(cls, state: dict[str, Any] | None, instance: str, *, start_after: int | None = None,
                start_time_us: int | None = None) -> ReplayPosition:
        """The position to continue from on ``instance``.

        Without a v2 state (a fresh run, or a checkpoint of the v1 protocol) it starts after
        ``start_after`` or at ``start_time_us``. With a state of the same instance it continues after
        its seq. With a state of another instance the seq means nothing there: it starts at the
        last delivered row's time (rows of that very time may come again; the consumers' fold
        de-duplicates them by record version).
        """
        if not state or state.get("protocol") != PROTOCOL:
            return cls(instance, start_after=start_after, start_time_us=start_time_us)
        seq = state.get("seq")
        if state.get("instance") == instance:
            pos = cls(instance, seq=seq if isinstance(seq, int) else None,
                      start_after=state.get("start_after") if isinstance(state.get("start_after"), int) else None,
                      start_time_us=state.get("start_time_us") if isinstance(state.get("start_time_us"), int)
                      else None)
            witnessed = state.get("witnessed_us")
            pos.witnessed_us = witnessed if isinstance(witnessed, int) else None
            return pos
        witnessed = state.get("witnessed_us")
        when = witnessed if isinstance(witnessed, int) else state.get("start_time_us")
        return cls(instance, start_time_us=when if isinstance(when, int) else start_time_us)
