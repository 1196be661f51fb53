"""The contract between producers and consumers: typed events, their Avro schemas and topics.

Owns the event records, the typed record fields, the collection-to-topic-and-key map, the Avro
codec (compiled writers and readers, the native wire encoder), collection names, ``createdAt``
parsing, times, and the fold rule that orders versions of a record. Pure: no sockets, no Kafka, no
clock. May import only :mod:`runtime.errors` and :mod:`runtime.atproto`.
"""
