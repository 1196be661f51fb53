"""Pure AT Protocol data primitives: bytes in, values out (no sockets, clocks or Kafka).

Modules, from the bottom up:

* :mod:`~runtime.atproto.errors` -- the :class:`~runtime.atproto.errors.AtprotoFormatError` tree.
* :mod:`~runtime.atproto.cid` -- :class:`~runtime.atproto.cid.CID` links.
* :mod:`~runtime.atproto.dagcbor` -- DAG-CBOR encode/decode and the ``$link``/``$bytes`` JSON form.
* :mod:`~runtime.atproto.car` -- CAR v1 archives in memory and on disk.
* :mod:`~runtime.atproto.mst` -- the repository Merkle Search Tree, incl. Sync 1.1 inversion.
* :mod:`~runtime.atproto.tid` -- timestamp identifiers (record keys, revisions).
* :mod:`~runtime.atproto.crypto`, :mod:`~runtime.atproto.commit`,
  :mod:`~runtime.atproto.identity` -- keys and signatures, signed commits, DID documents.
* :mod:`~runtime.atproto.repo` -- whole repositories and firehose commit verification.
* :mod:`~runtime.atproto.capture` -- the capture file format of relay frames.
* :mod:`~runtime.atproto.segment` -- Jetstream v2's sealed segment files (``.jss``).

Imports no other package of the project: the formats stand alone, and both the producers and the
simulators (which write real bytes with them) build on them.
"""
