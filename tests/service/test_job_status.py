"""The API's status values are the state machine's (``app.jobs.tables.JobStatus``), and the groups
the code checks against partition them."""

from __future__ import annotations

from typing import get_args

from app.jobs import schemas
from app.jobs.tables import ACTIVE, TERMINAL, UNFINISHED, JobStatus


def test_the_api_lists_exactly_the_job_statuses() -> None:
    assert set(get_args(schemas.JobStatus)) == {s.value for s in JobStatus}


def test_every_status_is_unfinished_or_terminal_and_active_ones_are_unfinished() -> None:
    assert set(UNFINISHED) | set(TERMINAL) == set(JobStatus)
    assert not set(UNFINISHED) & set(TERMINAL)
    assert set(ACTIVE) < set(UNFINISHED) and JobStatus.QUEUED not in ACTIVE
