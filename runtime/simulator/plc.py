"""A PLC directory simulator: ``GET /{did}`` answers the DID document, as https://plc.directory does.

Unknown DIDs answer 404 (``DID not registered``), tombstoned ones 410 (``DID not available``).
Documents are registered in-process (:meth:`PlcDirectory.register`), loaded from a JSON object of
DID -> document (the fixtures' ``did_docs.json.zst`` shape), or, as a simulator-only extension,
``POST /{did}`` with the document as the body (the real directory takes signed operations there).
It counts requests so tests can assert how often clients resolve.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import orjson
import zstandard

from runtime.errors import ConfigError
from runtime.simulator.httpd import HttpServer, Request, Response, ThreadServed

log = logging.getLogger(__name__)

DID_CONTEXT: Final = ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1",
                      "https://w3id.org/security/suites/secp256k1-2019/v1"]


def did_document(did: str, signing_multikey: str, pds_endpoint: str, handle: str | None = None) -> dict[str, Any]:
    """A DID document in the shape the PLC directory serves.

    Args:
        did: the DID.
        signing_multikey: the ``#atproto`` key as ``publicKeyMultibase`` (``z...``).
        pds_endpoint: the PDS URL (``#atproto_pds`` service).
        handle: the handle claimed in ``alsoKnownAs``.
    """
    return {
        "@context": list(DID_CONTEXT),
        "id": did,
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                "publicKeyMultibase": signing_multikey}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds_endpoint}],
    }


def load_documents(path: Path) -> dict[str, dict[str, Any]]:
    """Read a JSON object of DID -> document (``.zst`` compressed allowed).

    Raises:
        ConfigError: the file does not hold a JSON object.
    """
    data = path.read_bytes()
    if path.suffix == ".zst":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    docs = orjson.loads(data)
    if not isinstance(docs, dict):
        raise ConfigError(f"{path}: expected a JSON object of DID -> document")
    return docs


class PlcDirectory:
    """The directory's state and request handler (serve it with :class:`PlcSimulator`)."""

    def __init__(self, documents: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.documents: dict[str, dict[str, Any]] = dict(documents or {})
        self.tombstoned: set[str] = set()
        self.requests: Counter[str] = Counter()

    def register(self, document: dict[str, Any]) -> None:
        """Add or replace the document of ``document["id"]``."""
        did = document.get("id")
        if not isinstance(did, str) or not did.startswith("did:"):
            raise ValueError("a DID document needs an 'id' that is a DID")
        self.documents[did] = document
        self.tombstoned.discard(did)

    def tombstone(self, did: str) -> None:
        """Make ``did`` answer 410 from now on."""
        self.documents.pop(did, None)
        self.tombstoned.add(did)

    async def handle(self, req: Request) -> Response:
        """Answer one request."""
        path = req.path.strip("/")
        if path == "_health":
            return Response.json(200, {"version": "atproto-backfill-simulator"})
        did = path.split("/", 1)[0]
        if not did.startswith("did:"):
            return Response.json(404, {"message": "not found"})
        self.requests[did] += 1
        if req.method == "POST":
            try:
                doc = orjson.loads(req.body)
                if doc.get("id") != did:
                    return Response.json(400, {"message": "document id does not match the path"})
                self.register(doc)
            except (orjson.JSONDecodeError, AttributeError, ValueError) as e:
                return Response.json(400, {"message": f"bad document: {e}"})
            return Response.json(200, {"ok": True})
        if req.method != "GET":
            return Response.json(405, {"message": "method not allowed"})
        if did in self.tombstoned:
            return Response.json(410, {"message": f"DID not available: {did}"})
        doc = self.documents.get(did)
        if doc is None:
            return Response.json(404, {"message": f"DID not registered: {did}"})
        return Response(200, orjson.dumps(doc), content_type="application/did+ld+json; charset=utf-8")


class PlcSimulator(ThreadServed):
    """A PLC directory on loopback.

    Use ``async with PlcSimulator(...)`` inside a loop, or :meth:`start_in_thread` from synchronous
    code (tests).
    """

    thread_name = "plc-sim"

    def __init__(self, directory: PlcDirectory | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = directory or PlcDirectory()
        self.server = HttpServer(self.directory.handle, host, port, name="plc")

    @property
    def url(self) -> str:
        """The directory's base URL."""
        return self.server.url

    async def start(self) -> None:
        """Start listening."""
        await self.server.start()
        log.info("PLC directory simulator on %s (%d documents)", self.url, len(self.directory.documents))

    async def stop(self) -> None:
        """Stop listening."""
        await self.server.stop()
