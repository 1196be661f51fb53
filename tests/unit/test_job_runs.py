"""The re-run rule of a job name: checkpoint numbers grow across runs, cursors only within a run."""

from __future__ import annotations

import pytest

from runtime.errors import CursorRegressionError
from runtime.kafka.checkpoint import JobState


def state(cursor: int, checkpoint: int, run: int) -> JobState:
    return JobState(job="j", source="jetstream", cursor=cursor, checkpoint=checkpoint, run=run)


def test_a_new_run_may_start_behind_the_previous_runs_cursor() -> None:
    finished = state(cursor=1000, checkpoint=7, run=1)
    state(cursor=10, checkpoint=8, run=2).check_forward(finished)
    with pytest.raises(CursorRegressionError, match="behind"):
        state(cursor=10, checkpoint=8, run=1).check_forward(finished)  # the same run: a regression


def test_checkpoint_numbers_and_runs_never_go_back() -> None:
    last = state(cursor=10, checkpoint=8, run=2)
    with pytest.raises(CursorRegressionError, match="checkpoint 8 after 8"):
        state(cursor=20, checkpoint=8, run=3).check_forward(last)
    with pytest.raises(CursorRegressionError, match="run 1 after run 2"):
        state(cursor=20, checkpoint=9, run=1).check_forward(last)


def test_a_checkpoint_of_before_run_numbers_reads_as_run_1() -> None:
    old = JobState.from_bytes(b'{"job": "j", "source": "jetstream", "cursor": 5, "checkpoint": 3, "runs": 2}')
    assert (old.run, old.runs) == (1, 2)
    assert JobState.from_bytes(state(1, 2, 3).to_bytes()).run == 3
