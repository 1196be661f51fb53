"""The Avro schemas that are the contract between producers and consumers.

One ``.avsc`` per typed Bluesky collection (file named by the NSID), ``generic`` for every other
collection, ``identity`` and ``account`` for account-level events, and ``dead_letter`` for input
that could not be processed. :func:`load` returns the parsed JSON; :func:`names` lists them.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


def names() -> list[str]:
    """Names of every shipped schema (file names without ``.avsc``), sorted."""
    return sorted(
        p.name[: -len(".avsc")]
        for p in resources.files(__name__).iterdir()
        if p.name.endswith(".avsc")
    )


@cache
def _text(name: str) -> str:
    return (resources.files(__name__) / f"{name}.avsc").read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` as parsed JSON (a fresh copy each call).

    Raises:
        FileNotFoundError: no such schema is shipped.
    """
    data: dict[str, Any] = json.loads(_text(name))
    return data
