"""The one place that maps an event to its topic, schema and key.

Topics are ``<prefix>.<collection>`` for records, ``<prefix>.identity``, ``<prefix>.account`` and
``<prefix>.sync`` for DID-level events; the key is always the DID, so each repository stays ordered within one
partition. Internal topics: ``<prefix>.control.jobs`` (job checkpoints, compacted),
``<prefix>.dlq`` (producer dead letters), ``<topic>.dlq`` (consumer dead letters),
``<prefix>.backfill.dids`` (the DID work topic) and ``<prefix>.backfill.repo_status``.
"""

from __future__ import annotations

from typing import Final

from runtime.contract.records import AccountEvent, Event, IdentityEvent, SyncEvent
from runtime.errors import InvalidRecordError

#: Collections with their own typed schema; every other collection uses ``generic``.
TYPED_COLLECTIONS: Final[frozenset[str]] = frozenset({
    "app.bsky.feed.post",
    "app.bsky.feed.like",
    "app.bsky.feed.repost",
    "app.bsky.graph.follow",
    "app.bsky.graph.block",
    "app.bsky.actor.profile",
})

#: Configs of the control topic ``<prefix>.control.jobs`` (job checkpoints, keyed by job name).
#: Compacted: once the log cleaner ran, each job's newest checkpoint is all that is left of it.
#: Kafka never cleans the active segment, and by default a segment rolls only after 7 days or
#: 1 GiB, so a job checkpointing every few seconds would leave a week of checkpoints for every
#: reader (``--resume``, ``--until-done``, ``backfill status``) to read. Segments roll hourly here.
CONTROL_TOPIC_CONFIG: Final[dict[str, str]] = {
    "cleanup.policy": "compact",
    "segment.ms": str(3600 * 1000),
}

#: The longest data topic name: Kafka's limit of 249 characters, less the consumers' ``.dlq`` suffix.
MAX_DATA_TOPIC_LEN: Final = 249 - len(".dlq")

IDENTITY: Final = "identity"
ACCOUNT: Final = "account"
SYNC: Final = "sync"
#: The topics (and schemas) of DID-level events, by suffix.
DID_LEVEL: Final[frozenset[str]] = frozenset({IDENTITY, ACCOUNT, SYNC})
#: Topic suffixes that are not collections (never matched by collection filters).
INTERNAL_SUFFIXES: Final = ("control.", "backfill.", "dlq")


def schema_name_for_collection(collection: str) -> str:
    """Name of the schema (in ``schemas/``) that carries records of ``collection``."""
    return collection if collection in TYPED_COLLECTIONS else "generic"


def schema_name_for(event: Event) -> str:
    """Name of the schema that carries ``event``."""
    if isinstance(event, IdentityEvent):
        return IDENTITY
    if isinstance(event, AccountEvent):
        return ACCOUNT
    if isinstance(event, SyncEvent):
        return SYNC
    return schema_name_for_collection(event.collection)


class TopicMap:
    """Topic names for one prefix.

    Nothing is cached here: a producer works out the route of a collection (topic, encoder, metric
    label) once and keeps it (:class:`producers.publish.Publisher`).
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "atproto") -> None:
        self.prefix = prefix

    def for_collection(self, collection: str) -> str:
        """``<prefix>.<collection>``.

        Raises:
            InvalidRecordError: the topic would be longer than Kafka allows (with room for the
                consumers' ``.dlq`` suffix): a record of that collection is dead-lettered.
        """
        topic = f"{self.prefix}.{collection}"
        if len(topic) > MAX_DATA_TOPIC_LEN:
            raise InvalidRecordError(f"collection {collection[:100]!r}... makes a topic name of {len(topic)} "
                                     f"characters (Kafka allows {MAX_DATA_TOPIC_LEN} before '.dlq')")
        return topic

    def for_event(self, event: Event) -> str:
        """The topic ``event`` is written to."""
        if isinstance(event, IdentityEvent):
            return f"{self.prefix}.{IDENTITY}"
        if isinstance(event, AccountEvent):
            return f"{self.prefix}.{ACCOUNT}"
        if isinstance(event, SyncEvent):
            return f"{self.prefix}.{SYNC}"
        return self.for_collection(event.collection)

    @staticmethod
    def key_for(event: Event) -> bytes:
        """The Kafka key: the DID, so one repository's events stay in order."""
        return event.did.encode()

    def collection_of(self, topic: str) -> str | None:
        """The collection (or ``identity``/``account``/``sync``) a data topic carries; None for others."""
        head = self.prefix + "."
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        if rest.startswith(INTERNAL_SUFFIXES) or rest.endswith(".dlq"):
            return None
        return rest

    @property
    def control(self) -> str:
        """Compacted topic of job checkpoints keyed by job name."""
        return f"{self.prefix}.control.jobs"

    @property
    def dead_letters(self) -> str:
        """Producer-side dead-letter topic."""
        return f"{self.prefix}.dlq"

    @staticmethod
    def dlq_for(topic: str) -> str:
        """Consumer-side dead-letter topic for messages read from ``topic``."""
        return f"{topic}.dlq"

    @property
    def dids(self) -> str:
        """The DID work topic shared by repo-backfill replicas."""
        return f"{self.prefix}.backfill.dids"

    @property
    def repo_status(self) -> str:
        """Per-DID backfill outcomes."""
        return f"{self.prefix}.backfill.repo_status"
