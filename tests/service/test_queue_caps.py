"""Limits that queue instead of failing: an owner's jobs beyond ``LAFTER_MAX_ACTIVE_JOBS_PER_OWNER``
(1 on this stack) wait queued, outside the broker, with their position, and run oldest first, one
at a time, even with two idle workers; another owner's jobs do not wait behind them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from app.core.db import make_engine
from app.core.migrate import upgrade_head
from app.jobs import repository
from app.jobs.tables import Job, JobStatus
from tests.service.helpers import wait_for

if TYPE_CHECKING:
    from tests.service.fixtures_worker import Stack

pytest_plugins = ["tests.service.fixtures_worker"]


def test_jobs_beyond_the_cap_wait_in_order_and_all_succeed(stack: Stack) -> None:
    assert stack.cap == 1
    stack.stop_workers()  # nothing runs while the queue is looked at
    tenant = stack.tenant("capped")
    jobs = [tenant.submit(seed=i) for i in range(4)]
    assert [j["status"] for j in jobs] == ["queued"] * 4
    assert [j["queue_position"] for j in jobs] == [None, 1, 2, 3]
    # Only the job holding the slot was handed to the broker, and only it says it was sent.
    assert [stack.in_broker(j["id"]) for j in jobs] == [True, False, False, False]
    assert [_sent(stack, j["id"]) for j in jobs] == [True, False, False, False]

    # Cancelling a waiting job moves the ones behind it up.
    r = tenant.client.post(f"/v1/jobs/{jobs[2]['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert tenant.job(jobs[3]["id"])["queue_position"] == 2

    other = stack.tenant("uncapped-neighbour")
    neighbour = other.submit()
    assert neighbour["queue_position"] is None  # another owner's cap is not this owner's

    booting = [stack.boot_worker() for _ in range(2)]  # two idle workers, and still one at a time
    last = jobs[3]["id"]
    seen: list[Any] = []

    def finished() -> bool:
        job = tenant.job(last)
        if not seen or seen[-1] != job["queue_position"]:
            seen.append(job["queue_position"])
        return job["status"] in ("succeeded", "failed", "cancelled")

    wait_for(finished, 180, 0.1, "the capped jobs to finish")
    for b in booting:
        b.join()

    done = [tenant.job(j["id"]) for j in jobs]
    assert [j["status"] for j in done] == ["succeeded", "succeeded", "cancelled", "succeeded"], done
    assert done[2]["started_at"] is None
    ran = [done[0], done[1], done[3]]
    for before, after in pairwise(ran):
        assert after["started_at"] >= before["finished_at"], (before, after)  # one at a time, in order
    waiting = [p for p in seen if p is not None]
    assert seen[-1] is None and all(a >= b for a, b in pairwise(waiting)), seen
    assert 1 in seen, seen  # it moved up to next-in-line before it ran

    # Every message was taken, and with it its marker: none is left to hide a lost message.
    ids = [j["id"] for j in jobs] + [neighbour["id"]]
    assert not [i for i in ids if stack.redis().exists(f"lafter:sent:{i}")]

    neighbour_done = other.wait_final(neighbour["id"])
    assert neighbour_done["status"] == "succeeded"
    assert neighbour_done["started_at"] < done[3]["started_at"]  # did not queue behind "capped"


def _sent(stack: Stack, job_id: str) -> bool:
    """Whether the job's row records a message sent (``enqueued_at``)."""
    engine = make_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            stamp = conn.execute(
                sa.text("SELECT enqueued_at FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar()
    finally:
        engine.dispose()
    return stamp is not None


def test_a_queue_position_is_read_from_one_snapshot(tmp_path: Path) -> None:
    """The position counts the owner's queued jobs ahead and their running ones. Counted by two
    statements, a job that starts between them was counted twice (queued ahead, then running) and the
    next job's position jumped from 2 to 3 for a moment; it must stay 2 either way."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_head(url)
    engine = make_engine(url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with sessions() as session:
        for i in range(3):
            session.add(Job(id=f"job_{i}", owner_id="o", status=JobStatus.QUEUED, base_model="x::random",
                            class_names=["a", "b"], seed=0, created_at=start + timedelta(seconds=i)))  # fmt: skip
        session.commit()

    statements = 0

    def first_job_starts_between_statements(*_: object) -> None:
        nonlocal statements
        statements += 1
        if statements == 2:  # what a worker's claim does, committed from its own connection
            with engine.begin() as other:
                other.execute(sa.text("UPDATE jobs SET status = 'running' WHERE id = 'job_0'"))

    with sessions() as session:
        last = session.get(Job, "job_2")
        assert last is not None
        event.listen(engine, "before_cursor_execute", first_job_starts_between_statements)
        try:
            position = repository.queue_position(session, last, cap=1)
        finally:
            event.remove(engine, "before_cursor_execute", first_job_starts_between_statements)
    assert position == 2  # job_1 is next in line whether job_0 is still queued or already running
