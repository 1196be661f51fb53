"""Options more than one consumer command takes, declared once (those every consumer takes, with the
run wrapper, are :mod:`consumers.cli`'s).

``--account-removal`` / ``--removal-statuses``: what an account deletion or takedown event does to
the account's stored records; ``--resync``: what a repository replacement (Jetstream v2's ``#sync``,
followed by the repository's current records) does to the DID's older ones. Each sink words the
help for what it stores; :func:`removal_statuses` and :func:`resync_purge` read them the same way for
every sink.
"""

from __future__ import annotations

import argparse

from runtime.errors import ConfigError
from runtime.process.options import Opt


def account_removal_options(effect: str, resync_effect: str) -> tuple[Opt, Opt, Opt]:
    """``--account-removal keep|purge``, ``--removal-statuses`` and ``--resync purge|keep``.

    Args:
        effect: the sink's help of ``--account-removal``: what keep and purge do to what it stores.
        resync_effect: the sink's help of ``--resync``.
    """
    return (
        Opt(("--account-removal",), "account_removal", "BACKFILL_ACCOUNT_REMOVAL", "keep", effect,
            choices=("keep", "purge")),
        Opt(("--removal-statuses",), "removal_statuses", "BACKFILL_REMOVAL_STATUSES", "deleted,takendown",
            "account statuses that count as a removal for --account-removal purge (comma-separated)"),
        Opt(("--resync",), "resync", "BACKFILL_RESYNC", "purge", resync_effect, choices=("purge", "keep")),
    )


def resync_purge(ns: argparse.Namespace) -> bool:
    """True when a sync event purges the DID's older record versions (``--resync purge``)."""
    return bool(ns.resync == "purge")


def removal_statuses(ns: argparse.Namespace) -> frozenset[str]:
    """The statuses the sink purges on: empty for ``--account-removal keep``.

    Raises:
        ConfigError: ``purge`` without any status.
    """
    statuses = frozenset(s.strip() for s in (ns.removal_statuses or "").split(",") if s.strip())
    if ns.account_removal != "purge":
        return frozenset()
    if not statuses:
        raise ConfigError("--account-removal purge needs at least one --removal-statuses value")
    return statuses
