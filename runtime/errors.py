"""The project's exception tree.

::

    BackfillError                      root of everything this project raises on purpose
    ├── ConfigError                    bad flags/environment; a usage error, reported before connecting
    │   └── OffsetMismatchError        stored offsets of another cluster/topic incarnation, refused
    ├── SourceError                    an upstream (Jetstream, relay, PDS, PLC) failed in a way we retry or report
    │   └── HandleResolutionError      a handle that does not resolve to a DID
    ├── SinkUnavailableError           the sink (database, queue file) is briefly unreachable: retry the batch
    ├── DropError                      one input item is bad upstream data: counted, dead-lettered, skipped
    │   ├── DecodeError                bytes that do not decode (malformed JSON/CBOR/CAR, bad Avro)
    │   └── InvalidRecordError         decodes, but the record does not fit its collection's shape
    └── FatalError                     our own state is broken: stop loudly, never skip
        ├── CursorRegressionError      a checkpoint would move a cursor backwards
        ├── CommitError                a Kafka transaction / offset / database commit failed
        │   └── FencedError            another instance of this producer (same transactional id) took over
        └── DeliveryError              Kafka refused to persist produced data

``DropError`` carries a ``reason`` from a closed set (see :data:`DROP_REASONS`) that is used as the
metric label and written into the dead-letter record.
"""

from __future__ import annotations

from typing import Final

#: The closed set of reasons an input item can be dropped for. Metric labels use exactly these.
DROP_REASONS: Final[tuple[str, ...]] = (
    "malformed_json",
    "malformed_frame",
    "malformed_cbor",
    "malformed_car",
    "decompress_failed",
    "oversize",
    "invalid_record",
    "missing_block",
    "bad_cid",
    "bad_signature",
    "bad_mst_proof",
    "unknown_event",
    "decode_avro",
    "transform_failed",
    "http_error",
    "repo_unavailable",
    "retries_exhausted",
    "unsafe_endpoint",
    "too_many_collections",
)


class BackfillError(Exception):
    """Root of every exception this project raises on purpose."""


class ConfigError(BackfillError):
    """Invalid flags or environment: a usage error, raised before anything connects."""


class OffsetMismatchError(ConfigError):
    """Stored offsets count another cluster or another incarnation of a topic, and the consumer was
    told to refuse them (``--offset-mismatch refuse``)."""


class SourceError(BackfillError):
    """An upstream service failed (connection, protocol, HTTP status); retried or reported."""


class HandleResolutionError(SourceError):
    """A Bluesky handle did not resolve to a DID."""


class SinkUnavailableError(BackfillError):
    """The sink is briefly unreachable (database restart, network); the batch is retried intact."""


class DropError(BackfillError):
    """One input item is bad upstream data: it is counted, dead-lettered and skipped.

    Args:
        reason: one of :data:`DROP_REASONS`.
        detail: human-readable context (never logged per item; kept in the dead letter).
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(DropError):
    """Bytes that do not decode."""


class InvalidRecordError(DropError):
    """A record that decodes but does not have its collection's shape."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_record", detail)


class FatalError(BackfillError):
    """Our own state is broken; the process must stop loudly rather than skip or duplicate."""


class CursorRegressionError(FatalError):
    """A checkpoint would move a cursor (or a stored offset) backwards."""


class CommitError(FatalError):
    """A Kafka transaction, an offset commit or a database commit failed."""


class FencedError(CommitError):
    """A newer instance of this producer (the same transactional id: the same job, or the same
    replica id) started and fenced this one; this one must stop and write nothing more.

    An operational condition, not a bug: the message says everything, so no traceback is logged.
    """

    @classmethod
    def of(cls, who: str, kind: str, transactional_id: str, detail: str) -> FencedError:
        """The error for ``who`` (``job J``, ``replica R``), fenced by a newer instance with the same ``kind``."""
        return cls(f"{who}: fenced by a newer instance with the same {kind} (transactional id {transactional_id}), "
                   f"which took over; this instance stops and writes nothing more ({detail})")


class DeliveryError(FatalError):
    """Kafka reported that produced data could not be persisted."""
