"""DID lists from flags: comma-separated values or ``@FILE`` (one DID per line, ``#`` comments)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ConfigError

ATPROTO_METHODS = ("did:plc:", "did:web:")


def split_csv(value: str | None) -> list[str]:
    """Non-empty, stripped items of a comma-separated value."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def check_did(did: str, methods: tuple[str, ...] = ("did:",)) -> str:
    """Return ``did`` if it starts with one of ``methods``.

    Raises:
        ConfigError: it does not.
    """
    if not did.startswith(methods):
        kind = "a DID" if methods == ("did:",) else f"an atproto DID ({', '.join(m[:-1] for m in methods)})"
        raise ConfigError(f"not {kind}: {did!r}")
    return did


def read_dids_file(path: Path, methods: tuple[str, ...] = ("did:",)) -> list[str]:
    """DIDs of a file, one per line (blank lines and ``#`` comments ignored).

    Raises:
        ConfigError: unreadable, or a line that is not a DID.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read DID file {path}: {e}") from e
    return [check_did(line.strip(), methods) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse_dids(value: str | None, methods: tuple[str, ...] = ("did:",)) -> list[str]:
    """DIDs from ``a,b,c`` or ``@FILE``.

    Raises:
        ConfigError: an unreadable file or something that is not a DID.
    """
    if not value:
        return []
    if value.startswith("@"):
        return read_dids_file(Path(value[1:]), methods)
    return [check_did(d, methods) for d in split_csv(value)]
