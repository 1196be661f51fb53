"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from runtime.atproto import native


@pytest.fixture
def python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native fast path turned off: the pure-Python reference path alone."""
    monkeypatch.setattr(native, "NATIVE", None)


@pytest.fixture(params=["native", "python"])
def atproto_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the native fast path and on the pure-Python path alone (same verdicts)."""
    if request.param == "python":
        monkeypatch.setattr(native, "NATIVE", None)
    elif native.NATIVE is None:
        pytest.skip("the native extension is not built")
    return str(request.param)
