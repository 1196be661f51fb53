"""The native BLAKE2b of event keys (``_keyhash.c``) gives hashlib's digests, and so does the fallback."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.contract import keyhash
from runtime.contract.keyhash import key_digest, key_hash64
from tests.native import missing_extension


def _native() -> object:
    if keyhash.NATIVE is None:
        missing_extension("runtime/contract/_keyhash.c")
    return keyhash.NATIVE


@given(data=st.one_of(st.binary(max_size=600), st.binary(min_size=120, max_size=300)),
       size=st.integers(min_value=1, max_value=64))
@settings(max_examples=400, deadline=None)
def test_native_digests_are_hashlibs(data: bytes, size: int) -> None:
    native: object = _native()
    assert native.digest(data, size) == hashlib.blake2b(data, digest_size=size).digest()  # type: ignore[attr-defined]
    assert native.hash64(data) == int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")  # type: ignore[attr-defined]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 255, 256, 257, 1000])
def test_native_digests_at_block_edges(n: int) -> None:
    native: object = _native()
    data = bytes(range(256)) * 4
    for size in (1, 8, 16, 32, 64):
        assert native.digest(data[:n], size) == hashlib.blake2b(data[:n], digest_size=size).digest()  # type: ignore[attr-defined]


@given(key=st.text(max_size=200))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_keys_hash_alike_with_and_without_the_extension(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _native()
    try:
        expected: bytes | None = hashlib.blake2b(key.encode(), digest_size=16).digest()
    except UnicodeEncodeError:
        expected = None  # a lone surrogate: both refuse it, as str.encode does
    for native in (keyhash.NATIVE, None):
        with monkeypatch.context() as m:
            m.setattr(keyhash, "NATIVE", native)
            if expected is None:
                with pytest.raises(UnicodeEncodeError):
                    key_digest(key, 16)
                with pytest.raises(UnicodeEncodeError):
                    key_hash64(key)
                continue
            assert key_digest(key, 16) == expected
            assert key_hash64(key) == int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def test_the_native_module_refuses_what_it_cannot_hash() -> None:
    native: object = _native()
    for data, size in ((b"x", 0), (b"x", 65), ("x", -1)):
        with pytest.raises(ValueError):
            native.digest(data, size)  # type: ignore[attr-defined]
    for bad in (None, 5, bytearray(b"x")):
        with pytest.raises(TypeError):
            native.hash64(bad)  # type: ignore[attr-defined]


def test_a_lone_surrogate_is_refused_with_and_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    _native()
    for native in (keyhash.NATIVE, None):
        monkeypatch.setattr(keyhash, "NATIVE", native)
        with pytest.raises(UnicodeEncodeError):
            key_digest("did:plc:a\ud800", 8)
        with pytest.raises(UnicodeEncodeError):
            key_hash64("\udfff")
