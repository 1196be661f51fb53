"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from runtime.atproto import native


@pytest.fixture
def python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native fast path turned off: the pure-Python reference path alone."""
    monkeypatch.setattr(native, "NATIVE", None)
