"""Handle -> DID resolution through ``com.atproto.identity.resolveHandle`` on a configurable service."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import httpx

from runtime.errors import HandleResolutionError

DEFAULT_RESOLVER: Final = "https://public.api.bsky.app"
_HANDLE_RE: Final = re.compile(
    r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")


def resolve_handles(handles: Iterable[str], service: str = DEFAULT_RESOLVER, *,
                    client: httpx.Client | None = None, timeout: float = 10.0) -> dict[str, str]:
    """Resolve each handle (``@`` prefix allowed) to its DID.

    Raises:
        HandleResolutionError: a handle is malformed, unknown to the service, or the service fails.
    """
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=False)
    out: dict[str, str] = {}
    try:
        for raw in handles:
            handle = raw.strip().lstrip("@").lower()
            if not handle:
                continue
            if not _HANDLE_RE.match(handle):
                raise HandleResolutionError(f"not a valid handle: {raw!r}")
            url = f"{service.rstrip('/')}/xrpc/com.atproto.identity.resolveHandle"
            try:
                resp = http.get(url, params={"handle": handle})
            except httpx.HTTPError as e:
                raise HandleResolutionError(f"cannot reach {service} to resolve {handle}: {e}") from e
            if resp.status_code == 400:
                try:
                    msg = resp.json().get("message") or resp.text
                except ValueError:
                    msg = resp.text
                raise HandleResolutionError(f"handle {handle!r} does not resolve: {msg}")
            if resp.status_code != 200:
                raise HandleResolutionError(f"{service} answered {resp.status_code} resolving {handle!r}")
            try:
                did = resp.json()["did"]
            except (ValueError, KeyError, TypeError) as e:
                raise HandleResolutionError(f"{service} gave no DID for {handle!r}") from e
            if not isinstance(did, str) or not did.startswith("did:"):
                raise HandleResolutionError(f"{service} gave an invalid DID for {handle!r}: {did!r}")
            out[handle] = did
    finally:
        if own:
            http.close()
    return out
