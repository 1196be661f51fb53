"""Events to Avro datums: the envelope plus the typed fields of each collection's schema.

Pure functions. A record whose fields have the wrong JSON types for its collection raises
:class:`~runtime.errors.InvalidRecordError` (it is dead-lettered by the caller); the full record
always travels losslessly in ``record_json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, SyncEvent
from runtime.errors import InvalidRecordError

Datum = dict[str, Any]


def _str(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidRecordError(f"{field} is {type(value).__name__}, expected string")


def _dict(value: Any, field: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidRecordError(f"{field} is {type(value).__name__}, expected object")


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    raise InvalidRecordError(f"{field} is {type(value).__name__}, expected array")


def _str_list(value: Any, field: str) -> list[str]:
    items = _list(value, field)
    for item in items:
        if not isinstance(item, str):
            raise InvalidRecordError(f"{field} holds {type(item).__name__}, expected strings")
    return items


def _strong_ref(value: Any, field: str) -> tuple[str | None, str | None]:
    if type(value) is dict:  # the common case, checked without building error contexts
        uri = value.get("uri")
        cid = value.get("cid")
        if (uri is None or type(uri) is str) and (cid is None or type(cid) is str):
            return uri, cid
    ref = _dict(value, field)
    if ref is None:
        return None, None
    return _str(ref.get("uri"), field + ".uri"), _str(ref.get("cid"), field + ".cid")


def blob_cid(value: Any, field: str) -> str | None:
    """The CID of a blob reference (``{"$type":"blob","ref":{"$link":...}}`` or legacy ``{"cid":...}``)."""
    blob = _dict(value, field)
    if blob is None:
        return None
    ref = blob.get("ref")
    if isinstance(ref, dict):
        return _str(ref.get("$link"), field + ".ref.$link")
    if ref is not None:
        return _str(ref, field + ".ref")
    return _str(blob.get("cid"), field + ".cid")


def _self_labels(value: Any) -> list[str]:
    labels = _dict(value, "labels")
    if labels is None:
        return []
    out: list[str] = []
    for item in _list(labels.get("values"), "labels.values"):
        entry = _dict(item, "labels.values[]")
        if entry is not None:
            val = _str(entry.get("val"), "labels.values[].val")
            if val is not None:
                out.append(val)
    return out


_EMBED_KINDS: Final = {
    "app.bsky.embed.images": "images",
    "app.bsky.embed.video": "video",
    "app.bsky.embed.external": "external",
    "app.bsky.embed.record": "record",
    "app.bsky.embed.recordWithMedia": "recordWithMedia",
}


def _embed_kind(embed: dict[str, Any]) -> str:
    """The kind of an embed by its ``$type`` (``other`` for an unknown one, or one that is not a string)."""
    etype = embed.get("$type")
    return _EMBED_KINDS.get(etype, "other") if type(etype) is str else "other"


def _media(embed: dict[str, Any], field: str) -> tuple[list[str], str | None, str | None]:
    """(image CIDs, video CID, external URI) of a media embed."""
    kind = _embed_kind(embed)
    cids: list[str] = []
    if kind == "images":
        for img in _list(embed.get("images"), field + ".images"):
            entry = _dict(img, field + ".images[]")
            if entry is not None:
                cid = blob_cid(entry.get("image"), field + ".images[].image")
                if cid is not None:
                    cids.append(cid)
    elif kind == "video":
        return cids, blob_cid(embed.get("video"), field + ".video"), None
    elif kind == "external":
        ext = _dict(embed.get("external"), field + ".external")
        if ext is not None:
            return cids, None, _str(ext.get("uri"), field + ".external.uri")
    return cids, None, None


def _facets(value: Any) -> tuple[list[str], list[str], list[str]]:
    """(mentioned DIDs, link URIs, tags) of a post's facets."""
    mentions: list[str] = []
    links: list[str] = []
    tags: list[str] = []
    for facet in _list(value, "facets"):
        f = _dict(facet, "facets[]")
        if f is None:
            continue
        for feature in _list(f.get("features"), "facets[].features"):
            feat = _dict(feature, "facets[].features[]")
            if feat is None:
                continue
            ftype = feat.get("$type")
            if ftype == "app.bsky.richtext.facet#mention":
                did = _str(feat.get("did"), "facet.did")
                if did is not None:
                    mentions.append(did)
            elif ftype == "app.bsky.richtext.facet#link":
                uri = _str(feat.get("uri"), "facet.uri")
                if uri is not None:
                    links.append(uri)
            elif ftype == "app.bsky.richtext.facet#tag":
                tag = _str(feat.get("tag"), "facet.tag")
                if tag is not None:
                    tags.append(tag)
    return mentions, links, tags


def _post(rec: dict[str, Any]) -> tuple[Any, ...]:
    root_uri = root_cid = parent_uri = parent_cid = None
    reply = _dict(rec.get("reply"), "reply")
    if reply is not None:
        root_uri, root_cid = _strong_ref(reply.get("root"), "reply.root")
        parent_uri, parent_cid = _strong_ref(reply.get("parent"), "reply.parent")
    kind = record_uri = record_cid = external_uri = video_cid = None
    image_cids: list[str] = []
    embed = _dict(rec.get("embed"), "embed")
    if embed is not None:
        kind = _embed_kind(embed)
        if kind == "record":
            record_uri, record_cid = _strong_ref(embed.get("record"), "embed.record")
        elif kind == "recordWithMedia":
            inner = _dict(embed.get("record"), "embed.record")
            if inner is not None:
                record_uri, record_cid = _strong_ref(inner.get("record"), "embed.record.record")
            media = _dict(embed.get("media"), "embed.media")
            if media is not None:
                image_cids, video_cid, external_uri = _media(media, "embed.media")
        else:
            image_cids, video_cid, external_uri = _media(embed, "embed")
    facets = rec.get("facets")
    mentions, links, tags = _facets(facets) if facets is not None else ([], [], [])
    return (_str(rec.get("text"), "text"), _str_list(rec.get("langs"), "langs"),
            _str(rec.get("createdAt"), "createdAt"), root_uri, root_cid, parent_uri, parent_cid, kind,
            record_uri, record_cid, external_uri, image_cids, video_cid, mentions, links, tags,
            _str_list(rec.get("tags"), "tags"), _self_labels(rec.get("labels")))


def _subject_ref(rec: dict[str, Any]) -> tuple[Any, ...]:
    subject_uri, subject_cid = _strong_ref(rec.get("subject"), "subject")
    via = rec.get("via")
    via_uri, via_cid = _strong_ref(via, "via") if via is not None else (None, None)
    return subject_uri, subject_cid, _str(rec.get("createdAt"), "createdAt"), via_uri, via_cid


def _subject_did(rec: dict[str, Any]) -> tuple[Any, ...]:
    return _str(rec.get("subject"), "subject"), _str(rec.get("createdAt"), "createdAt")


def _profile(rec: dict[str, Any]) -> tuple[Any, ...]:
    pinned_uri, _ = _strong_ref(rec.get("pinnedPost"), "pinnedPost")
    return (_str(rec.get("displayName"), "displayName"), _str(rec.get("description"), "description"),
            blob_cid(rec.get("avatar"), "avatar"), blob_cid(rec.get("banner"), "banner"),
            _str(rec.get("createdAt"), "createdAt"), pinned_uri, _self_labels(rec.get("labels")))


@dataclass(frozen=True, slots=True)
class Typed:
    """The typed fields of one collection's schema: their names in schema order, the function
    that extracts their values (in the same order) from a record, and their values for a delete."""

    names: tuple[str, ...]
    extract: Callable[[dict[str, Any]], tuple[Any, ...]]
    empty: tuple[Any, ...]


_POST_FIELDS: Final = (
    "text", "langs", "created_at", "reply_root_uri", "reply_root_cid", "reply_parent_uri", "reply_parent_cid",
    "embed_kind", "embed_record_uri", "embed_record_cid", "embed_external_uri", "embed_image_cids",
    "embed_video_cid", "facet_mentions", "facet_links", "facet_tags", "tags", "labels")
_LISTS: Final = frozenset(("langs", "embed_image_cids", "facet_mentions", "facet_links", "facet_tags", "tags",
                           "labels"))


def _typed(names: tuple[str, ...], extract: Callable[[dict[str, Any]], tuple[Any, ...]]) -> Typed:
    return Typed(names, extract, tuple([] if n in _LISTS else None for n in names))


_SUBJECT_REF: Final = ("subject_uri", "subject_cid", "created_at", "via_uri", "via_cid")
_SUBJECT_DID: Final = ("subject", "created_at")

#: The typed fields of each typed collection (every other collection has none: the generic schema).
TYPED: Final[dict[str, Typed]] = {
    "app.bsky.feed.post": _typed(_POST_FIELDS, _post),
    "app.bsky.feed.like": _typed(_SUBJECT_REF, _subject_ref),
    "app.bsky.feed.repost": _typed(_SUBJECT_REF, _subject_ref),
    "app.bsky.graph.follow": _typed(_SUBJECT_DID, _subject_did),
    "app.bsky.graph.block": _typed(_SUBJECT_DID, _subject_did),
    "app.bsky.actor.profile": _typed(("display_name", "description", "avatar_cid", "banner_cid", "created_at",
                                      "pinned_post_uri", "labels"), _profile),
}

#: The envelope fields every record schema begins with, in schema order (``record_json`` follows them).
ENVELOPE_HEAD: Final = ("did", "collection", "rkey", "operation", "rev", "cid", "source", "cursor", "time_us",
                        "job")
#: The envelope fields every event schema (record, identity, account) ends with, after its own: the
#: Jetstream v2 times, None for other sources.
ENVELOPE_TAIL: Final = ("witnessed_at", "indexed_at")
#: The envelope fields every record schema has, in schema order: attributes of a RecordEvent.
ENVELOPE: Final = (*ENVELOPE_HEAD, *ENVELOPE_TAIL)
_NO_VALUES: Final[tuple[Any, ...]] = ()


def record_parts(event: RecordEvent, *, serialise: bool = True) -> tuple[bytes | None, tuple[Any, ...]]:
    """What a record event's Avro value holds besides its envelope: the record as JSON (UTF-8,
    None for a delete or when not ``serialise``) and the typed fields' values in schema order
    (none for other collections).

    Raises:
        InvalidRecordError: the record is not an object, has a ``$type`` other than its
            collection (typed collections), a typed field of the wrong JSON type, or a value JSON
            cannot hold.
    """
    rec = event.record
    typed = TYPED.get(event.collection)
    if rec is None:
        if event.operation != "delete":
            raise InvalidRecordError(f"{event.operation} without a record")
        return None, typed.empty if typed is not None else _NO_VALUES
    if type(rec) is not dict:
        raise InvalidRecordError(f"record is {type(rec).__name__}, expected object")
    record_json = event.record_json if serialise else None
    if serialise and record_json is None:
        try:
            record_json = orjson.dumps(rec)
        except orjson.JSONEncodeError as e:
            raise InvalidRecordError(f"record has no JSON form: {e}") from e
    if typed is None:
        return record_json, _NO_VALUES
    rtype = rec.get("$type")
    if rtype != event.collection:
        raise InvalidRecordError(f"$type {rtype!r} in collection {event.collection}")
    return record_json, typed.extract(rec)


def record_datum(event: RecordEvent, record_json: str | None = None) -> Datum:
    """The Avro datum of a record event (envelope + typed fields).

    Args:
        event: the event; ``event.record`` is the JSON-form record or None for a delete.
        record_json: the record already serialised, kept verbatim in the datum when given.

    Raises:
        InvalidRecordError: as :func:`record_parts`.
    """
    rj, values = record_parts(event, serialise=record_json is None)
    datum: Datum = {
        "did": event.did, "collection": event.collection, "rkey": event.rkey,
        "operation": event.operation, "rev": event.rev, "cid": event.cid, "source": event.source,
        "cursor": event.cursor, "time_us": event.time_us, "job": event.job,
        "record_json": record_json if record_json is not None else (rj.decode() if rj is not None else None),
    }
    typed = TYPED.get(event.collection)
    if typed is not None:
        datum.update(zip(typed.names, values, strict=True))
    datum["witnessed_at"] = event.witnessed_at
    datum["indexed_at"] = event.indexed_at
    return datum


def identity_datum(event: IdentityEvent) -> Datum:
    """The Avro datum of an identity event."""
    return {"did": event.did, "source": event.source, "cursor": event.cursor, "time_us": event.time_us,
            "job": event.job, "seq": event.seq, "time": event.time, "handle": event.handle,
            "witnessed_at": event.witnessed_at, "indexed_at": event.indexed_at}


def account_datum(event: AccountEvent) -> Datum:
    """The Avro datum of an account event."""
    return {"did": event.did, "source": event.source, "cursor": event.cursor, "time_us": event.time_us,
            "job": event.job, "seq": event.seq, "time": event.time, "active": event.active,
            "status": event.status, "witnessed_at": event.witnessed_at, "indexed_at": event.indexed_at}


def sync_datum(event: SyncEvent) -> Datum:
    """The Avro datum of a sync event."""
    return {"did": event.did, "source": event.source, "cursor": event.cursor, "time_us": event.time_us,
            "job": event.job, "seq": event.seq, "time": event.time, "rev": event.rev,
            "witnessed_at": event.witnessed_at, "indexed_at": event.indexed_at}


def datum_for(event: Event, record_json: str | None = None) -> Datum:
    """The Avro datum of any event (see :func:`record_datum`)."""
    if isinstance(event, RecordEvent):
        return record_datum(event, record_json)
    if isinstance(event, IdentityEvent):
        return identity_datum(event)
    if isinstance(event, SyncEvent):
        return sync_datum(event)
    return account_datum(event)


#: The event times a sink can store: those of a datetime (years 1 to 9999), in unix microseconds.
MIN_TIME_US: Final = -62_135_596_800_000_000
MAX_TIME_US: Final = 253_402_300_799_999_999


def event_from_datum(schema_name: str, datum: Datum) -> Event:
    """Rebuild the event from a decoded Avro datum (the consumers' side of the contract).

    Raises:
        InvalidRecordError: ``record_json`` does not parse, or ``time_us`` is not a time a sink can
            store (another tool wrote the value: ours are never outside it).
    """
    time_us = datum["time_us"]
    if type(time_us) is not int or not MIN_TIME_US <= time_us <= MAX_TIME_US:
        raise InvalidRecordError(f"time_us {str(time_us)[:40]} is not a storable event time")
    # absent when an earlier schema wrote the value and nothing resolved it against the shipped one
    witnessed_at, indexed_at = datum.get("witnessed_at"), datum.get("indexed_at")
    if schema_name == "identity":
        return IdentityEvent(did=datum["did"], handle=datum.get("handle"), seq=datum.get("seq"),
                             time=datum.get("time"), source=datum["source"], cursor=datum["cursor"],
                             time_us=datum["time_us"], job=datum.get("job", ""), witnessed_at=witnessed_at,
                             indexed_at=indexed_at)
    if schema_name == "account":
        return AccountEvent(did=datum["did"], active=datum["active"], status=datum.get("status"),
                            seq=datum.get("seq"), time=datum.get("time"), source=datum["source"],
                            cursor=datum["cursor"], time_us=datum["time_us"], job=datum.get("job", ""),
                            witnessed_at=witnessed_at, indexed_at=indexed_at)
    if schema_name == "sync":
        return SyncEvent(did=datum["did"], rev=datum["rev"], seq=datum.get("seq"), time=datum.get("time"),
                         source=datum["source"], cursor=datum["cursor"], time_us=datum["time_us"],
                         job=datum.get("job", ""), witnessed_at=witnessed_at, indexed_at=indexed_at)
    raw = datum.get("record_json")
    try:
        record = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError as e:
        raise InvalidRecordError(f"record_json does not parse: {e}") from e
    return RecordEvent(did=datum["did"], collection=datum["collection"], rkey=datum["rkey"],
                       operation=datum["operation"], rev=datum.get("rev"), cid=datum.get("cid"),
                       record=record, source=datum["source"], cursor=datum["cursor"],
                       time_us=datum["time_us"], job=datum.get("job", ""), witnessed_at=witnessed_at,
                       indexed_at=indexed_at)
