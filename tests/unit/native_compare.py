"""Shared by the tests that hold the native fast path against the pure-Python path
(test_atproto_native, test_atproto_native_verify): the tally of their verdicts on mutated input,
and the mutation of an MST node block."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any


class Outcomes(Counter[str]):
    """How often both paths refused, both accepted (the same value), or the native one bailed out."""

    def add(self, expected: Any, got: Any) -> None:
        """Count one comparison: ``expected`` from the Python path (None: refused), ``got`` from the
        native one (None: refused or bailed). The native path never accepts what Python refuses."""
        if expected is None:
            assert got is None
            self["both_refuse"] += 1
        elif got is None:
            self["native_bails"] += 1
        else:
            assert got == expected
            self["both_accept"] += 1


def mutated_node(rng: random.Random, block: bytes) -> bytes:
    """``block`` with one byte changed, cut short, one byte inserted, or a key character swapped for
    another (the order and depth checks)."""
    b = bytearray(block)
    how = rng.randrange(4)
    if how == 0:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:
        del b[rng.randrange(len(b)):]
    elif how == 2:
        b.insert(rng.randrange(len(b)), rng.randrange(256))
    else:
        b[rng.randrange(len(b))] = ord(rng.choice("az09.:-_~/"))
    return bytes(b)
