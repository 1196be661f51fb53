"""Events to Avro datums: the envelope plus the typed fields of each collection's schema.

Pure functions. A record whose fields have the wrong JSON types for its collection raises
:class:`~runtime.errors.InvalidRecordError` (it is dead-lettered by the caller); the full record
always travels losslessly in ``record_json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson

from runtime.errors import InvalidRecordError
from runtime.records import AccountEvent, Event, IdentityEvent, RecordEvent

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


def _media(embed: dict[str, Any], out: Datum, field: str) -> None:
    kind = _EMBED_KINDS.get(embed.get("$type", ""), "other")
    if kind == "images":
        cids = []
        for img in _list(embed.get("images"), field + ".images"):
            entry = _dict(img, field + ".images[]")
            if entry is not None:
                cid = blob_cid(entry.get("image"), field + ".images[].image")
                if cid is not None:
                    cids.append(cid)
        out["embed_image_cids"] = cids
    elif kind == "video":
        out["embed_video_cid"] = blob_cid(embed.get("video"), field + ".video")
    elif kind == "external":
        ext = _dict(embed.get("external"), field + ".external")
        if ext is not None:
            out["embed_external_uri"] = _str(ext.get("uri"), field + ".external.uri")


def _post(rec: dict[str, Any], out: Datum) -> None:
    out.update(_POST_OPTIONAL)  # what only some posts have (every extractor sets all its fields)
    out["text"] = _str(rec.get("text"), "text")
    out["langs"] = _str_list(rec.get("langs"), "langs")
    out["created_at"] = _str(rec.get("createdAt"), "createdAt")
    reply = _dict(rec.get("reply"), "reply")
    if reply is not None:
        out["reply_root_uri"], out["reply_root_cid"] = _strong_ref(reply.get("root"), "reply.root")
        out["reply_parent_uri"], out["reply_parent_cid"] = _strong_ref(reply.get("parent"), "reply.parent")
    embed = _dict(rec.get("embed"), "embed")
    if embed is not None:
        kind = _EMBED_KINDS.get(embed.get("$type", ""), "other")
        out["embed_kind"] = kind
        if kind == "record":
            out["embed_record_uri"], out["embed_record_cid"] = _strong_ref(embed.get("record"), "embed.record")
        elif kind == "recordWithMedia":
            inner = _dict(embed.get("record"), "embed.record")
            if inner is not None:
                out["embed_record_uri"], out["embed_record_cid"] = _strong_ref(
                    inner.get("record"), "embed.record.record")
            media = _dict(embed.get("media"), "embed.media")
            if media is not None:
                _media(media, out, "embed.media")
        else:
            _media(embed, out, "embed")
    mentions: list[str] = []
    links: list[str] = []
    tags: list[str] = []
    for facet in _list(rec.get("facets"), "facets"):
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
    out["facet_mentions"] = mentions
    out["facet_links"] = links
    out["facet_tags"] = tags
    out["tags"] = _str_list(rec.get("tags"), "tags")
    out["labels"] = _self_labels(rec.get("labels"))


def _subject_ref(rec: dict[str, Any], out: Datum) -> None:
    out["subject_uri"], out["subject_cid"] = _strong_ref(rec.get("subject"), "subject")
    out["created_at"] = _str(rec.get("createdAt"), "createdAt")
    out["via_uri"], out["via_cid"] = _strong_ref(rec.get("via"), "via")


def _subject_did(rec: dict[str, Any], out: Datum) -> None:
    out["subject"] = _str(rec.get("subject"), "subject")
    out["created_at"] = _str(rec.get("createdAt"), "createdAt")


def _profile(rec: dict[str, Any], out: Datum) -> None:
    out["display_name"] = _str(rec.get("displayName"), "displayName")
    out["description"] = _str(rec.get("description"), "description")
    out["avatar_cid"] = blob_cid(rec.get("avatar"), "avatar")
    out["banner_cid"] = blob_cid(rec.get("banner"), "banner")
    out["created_at"] = _str(rec.get("createdAt"), "createdAt")
    out["pinned_post_uri"], _ = _strong_ref(rec.get("pinnedPost"), "pinnedPost")
    out["labels"] = _self_labels(rec.get("labels"))


_TYPED: Final[dict[str, Callable[[dict[str, Any], Datum], None]]] = {
    "app.bsky.feed.post": _post,
    "app.bsky.feed.like": _subject_ref,
    "app.bsky.feed.repost": _subject_ref,
    "app.bsky.graph.follow": _subject_did,
    "app.bsky.graph.block": _subject_did,
    "app.bsky.actor.profile": _profile,
}

#: The post fields an extractor sets only when the post has a reply or an embed.
_POST_OPTIONAL: Final[Datum] = {
    "reply_root_uri": None, "reply_root_cid": None, "reply_parent_uri": None, "reply_parent_cid": None,
    "embed_kind": None, "embed_record_uri": None, "embed_record_cid": None, "embed_external_uri": None,
    "embed_image_cids": [], "embed_video_cid": None,
}

#: Default values of the typed fields, per collection, for deletes (every field null/empty).
_EMPTY: Final[dict[str, Datum]] = {
    "app.bsky.feed.post": {
        "text": None, "langs": [], "created_at": None, "reply_root_uri": None, "reply_root_cid": None,
        "reply_parent_uri": None, "reply_parent_cid": None, "embed_kind": None, "embed_record_uri": None,
        "embed_record_cid": None, "embed_external_uri": None, "embed_image_cids": [],
        "embed_video_cid": None, "facet_mentions": [], "facet_links": [], "facet_tags": [], "tags": [],
        "labels": [],
    },
    "app.bsky.feed.like": {"subject_uri": None, "subject_cid": None, "created_at": None,
                           "via_uri": None, "via_cid": None},
    "app.bsky.feed.repost": {"subject_uri": None, "subject_cid": None, "created_at": None,
                             "via_uri": None, "via_cid": None},
    "app.bsky.graph.follow": {"subject": None, "created_at": None},
    "app.bsky.graph.block": {"subject": None, "created_at": None},
    "app.bsky.actor.profile": {"display_name": None, "description": None, "avatar_cid": None,
                               "banner_cid": None, "created_at": None, "pinned_post_uri": None,
                               "labels": []},
}


def record_datum(event: RecordEvent, record_json: str | None = None) -> Datum:
    """The Avro datum of a record event (envelope + typed fields).

    Args:
        event: the event; ``event.record`` is the JSON-form record or None for a delete.
        record_json: the record already serialised (saves a re-serialisation when the source
            delivered JSON text); computed from ``event.record`` when None.

    Raises:
        InvalidRecordError: the record is not an object, has a ``$type`` other than its
            collection (typed collections), or a typed field of the wrong JSON type.
    """
    rec = event.record
    datum: Datum = {
        "did": event.did, "collection": event.collection, "rkey": event.rkey,
        "operation": event.operation, "rev": event.rev, "cid": event.cid, "source": event.source,
        "cursor": event.cursor, "time_us": event.time_us, "job": event.job, "record_json": None,
    }
    if rec is None:
        if event.operation != "delete":
            raise InvalidRecordError(f"{event.operation} without a record")
        empty = _EMPTY.get(event.collection)
        if empty is not None:
            datum.update(empty)
        return datum
    if not isinstance(rec, dict):
        raise InvalidRecordError(f"record is {type(rec).__name__}, expected object")
    extract = _TYPED.get(event.collection)
    if extract is not None:
        rtype = rec.get("$type")
        if rtype != event.collection:
            raise InvalidRecordError(f"$type {rtype!r} in collection {event.collection}")
        extract(rec, datum)
    datum["record_json"] = record_json if record_json is not None else orjson.dumps(rec).decode()
    return datum


def identity_datum(event: IdentityEvent) -> Datum:
    """The Avro datum of an identity event."""
    return {"did": event.did, "source": event.source, "cursor": event.cursor, "time_us": event.time_us,
            "job": event.job, "seq": event.seq, "time": event.time, "handle": event.handle}


def account_datum(event: AccountEvent) -> Datum:
    """The Avro datum of an account event."""
    return {"did": event.did, "source": event.source, "cursor": event.cursor, "time_us": event.time_us,
            "job": event.job, "seq": event.seq, "time": event.time, "active": event.active,
            "status": event.status}


def datum_for(event: Event, record_json: str | None = None) -> Datum:
    """The Avro datum of any event (see :func:`record_datum`)."""
    if isinstance(event, RecordEvent):
        return record_datum(event, record_json)
    if isinstance(event, IdentityEvent):
        return identity_datum(event)
    return account_datum(event)


def event_from_datum(schema_name: str, datum: Datum) -> Event:
    """Rebuild the event from a decoded Avro datum (the consumers' side of the contract).

    Raises:
        InvalidRecordError: ``record_json`` does not parse.
    """
    if schema_name == "identity":
        return IdentityEvent(did=datum["did"], handle=datum.get("handle"), seq=datum.get("seq"),
                             time=datum.get("time"), source=datum["source"], cursor=datum["cursor"],
                             time_us=datum["time_us"], job=datum.get("job", ""))
    if schema_name == "account":
        return AccountEvent(did=datum["did"], active=datum["active"], status=datum.get("status"),
                            seq=datum.get("seq"), time=datum.get("time"), source=datum["source"],
                            cursor=datum["cursor"], time_us=datum["time_us"], job=datum.get("job", ""))
    raw = datum.get("record_json")
    try:
        record = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError as e:
        raise InvalidRecordError(f"record_json does not parse: {e}") from e
    return RecordEvent(did=datum["did"], collection=datum["collection"], rkey=datum["rkey"],
                       operation=datum["operation"], rev=datum.get("rev"), cid=datum.get("cid"),
                       record=record, source=datum["source"], cursor=datum["cursor"],
                       time_us=datum["time_us"], job=datum.get("job", ""))
