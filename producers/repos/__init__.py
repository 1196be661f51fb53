"""The repository producer: ``backfill repos`` / ``python -m producers.repos`` (seed 002).

``pds`` is the polite HTTP client (getRepo to disk, listRepos), ``decode`` turns a CAR into typed
events (pure), ``source`` does one DID's work and is the list-job source, ``worktopic`` is the DID
work topic and its consumer-group replicas, ``app`` wires the CLI and ``run_batched_backfill``,
``discover`` finds referenced authors to enqueue, ``inspect`` lists a CAR's records.
"""

from producers.repos.app import run_batched_backfill

__all__ = ["run_batched_backfill"]
