"""Options more than one consumer command takes, declared once (those every consumer takes, with the
run wrapper, are :mod:`consumers.cli`'s).

``--account-removal`` / ``--removal-statuses``: what an account deletion or takedown event does to
the account's stored records. Each sink words the help for what it stores; :func:`removal_statuses`
reads both options the same way for every sink.
"""

from __future__ import annotations

import argparse

from runtime.errors import ConfigError
from runtime.process.options import Opt


def account_removal_options(effect: str) -> tuple[Opt, Opt]:
    """``--account-removal keep|purge`` and ``--removal-statuses``.

    Args:
        effect: the sink's help of ``--account-removal``: what keep and purge do to what it stores.
    """
    return (
        Opt(("--account-removal",), "account_removal", "BACKFILL_ACCOUNT_REMOVAL", "keep", effect,
            choices=("keep", "purge")),
        Opt(("--removal-statuses",), "removal_statuses", "BACKFILL_REMOVAL_STATUSES", "deleted,takendown",
            "account statuses that count as a removal for --account-removal purge (comma-separated)"),
    )


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
