"""Types of the native fast path (``_fastrepo.c``); every function returns None to say "use the Python path"."""

from collections.abc import Callable

def car_index(data: bytes, verify: bool, max_blocks: int, /) -> tuple[bytes, dict[bytes, bytes]] | None: ...
def mst_walk(
    root: bytes,
    lookup: dict[bytes, bytes] | Callable[[bytes], bytes | None],
    verify: bool,
    max_layer: int,
    limit: int,
    /,
) -> list[tuple[str, bytes]] | int | None: ...
def record_form(
    block: bytes, cid: bytes, max_depth: int, /
) -> tuple[str, dict[str, object], bytes | None] | bool | None: ...
def cid_str(cid: bytes, /) -> str | None: ...
