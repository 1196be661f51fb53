"""The optional C extensions (``runtime/atproto/_fastrepo.c``, ``runtime/contract/_avrowire.c``,
``runtime/contract/_keyhash.c``, ``producers/jetstream/_fastevent.c``) in tests.

``pip install`` builds them where a C compiler (and, for ``_fastrepo``, OpenSSL's headers) is
present, and leaves them out elsewhere: the pure-Python path then runs alone. A test of the native
path skips where the extension could not have been built, and fails where it could have been but
was not (an install that lost the fast path the README's benchmark figures depend on).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from typing import NoReturn

import pytest


def _compiler() -> bool:
    """A C compiler the build would use is here (``CC`` as setuptools reads it, else Python's own)."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    return bool(cc) and shutil.which(cc[0]) is not None


def _openssl_headers() -> bool:
    dirs = {sysconfig.get_config_var("INCLUDEDIR") or "/usr/include", "/usr/include", "/usr/local/include"}
    return any((Path(d) / "openssl" / "evp.h").is_file() for d in dirs)


def missing_extension(source: str, *, openssl: bool = False) -> NoReturn:
    """The extension built from ``source`` did not load: skip the calling test where it cannot be
    built (no C compiler, or no OpenSSL headers when ``openssl``), fail it where it can."""
    if not _compiler():
        pytest.skip(f"{source} is not built: no C compiler here")
    if openssl and not _openssl_headers():
        pytest.skip(f"{source} is not built: no OpenSSL headers here")
    pytest.fail(f"{source} was not built though a C compiler is here: reinstall (pip install .)")


def select_wire(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile the codec's Avro writers and readers with ``_avrowire`` (``kind`` "native") or without
    it ("python"), for the rest of the calling test."""
    from runtime.contract import avrowrite, codec

    if kind == "python":
        monkeypatch.setattr(avrowrite, "WIRE", None)
    elif avrowrite.WIRE is None:
        missing_extension("runtime/contract/_avrowire.c")
    monkeypatch.setattr(codec, "_SHIPPED", None)  # recompile the shipped schemas' encoders and decoders
