from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.jobs.tables import ACTIVE, UNFINISHED, Job, JobEvent, JobStatus

if TYPE_CHECKING:
    from app.core.storage import BlobStorage

log = logging.getLogger(__name__)


def get_any(session: Session, job_id: str, *, for_update: bool = False) -> Job | None:
    """A job whatever its owner (the worker, the reaper, the dispatcher)."""
    stmt = select(Job).where(Job.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def status_of(session: Session, job_id: str) -> tuple[str, int] | None:
    """(status, attempts) of a job, or None when it does not exist."""
    row = session.execute(select(Job.status, Job.attempts).where(Job.id == job_id)).one_or_none()
    return None if row is None else (row.status, row.attempts)


def unfinished_job_of_dataset(session: Session, dataset_id: str) -> str | None:
    """The id of a queued or running job that uses the dataset, if any."""
    stmt = select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(UNFINISHED)).limit(1)
    return session.scalar(stmt)


def jobs_of_model(session: Session, owner_id: str, model_id: str) -> Sequence[str]:
    """The owner's jobs that name ``model_id``, locked."""
    stmt = select(Job.id).where(Job.owner_id == owner_id, Job.model_id == model_id).with_for_update()
    return session.scalars(stmt).all()


def get(session: Session, owner_id: str, job_id: str, *, for_update: bool = False) -> Job | None:
    stmt = select(Job).where(Job.id == job_id, Job.owner_id == owner_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def by_idempotency_key(session: Session, owner_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def list_query(owner_id: str, status: str | None) -> Select[Any]:
    stmt = select(Job).where(Job.owner_id == owner_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return stmt


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    *,
    message: str | None = None,
    stage: str | None = None,
    step: int | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Add the job's next event. Its ``seq`` (the API's event id) comes from the job row's counter,
    whose UPDATE locks that row until this transaction ends: a job's events get 1, 2, 3... in commit
    order, so a poller's ``?after=`` cursor never skips one that commits late, and no number says
    anything about another job or owner."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_count=Job.event_count + 1)
        .returning(Job.event_count)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    event = JobEvent(
        job_id=job_id,
        seq=seq,
        kind=kind,
        message=message,
        stage=stage,
        step=step,
        level=level,
        data=data or {},
    )
    session.add(event)
    return event


def events(session: Session, job_id: str, after: int | None, limit: int) -> Sequence[JobEvent]:
    """The job's events after the one numbered ``after`` (its ``seq``), in order."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.seq > after)
    return session.scalars(stmt.order_by(JobEvent.seq).limit(limit)).all()


# --- the queue: slots, positions, lost workers --------------------------------------------------
# An owner's queued jobs run oldest first. With a cap of K, the oldest K - (running jobs) queued jobs
# hold a slot and are sent to the workers; the rest wait, not in the broker, and move up.


def checkpoint_key(job_id: str) -> str:
    """Where a job's stage-2 checkpoint lives in blob storage (written by the worker)."""
    return f"jobs/{job_id}/checkpoint.pt"


def delete_checkpoint(storage: BlobStorage, job_id: str) -> None:
    """Drop a finished job's checkpoint; a failure is logged (the blob is only wasted space)."""
    try:
        storage.delete(checkpoint_key(job_id))
    except Exception:
        log.warning("could not delete the checkpoint of job %s", job_id, exc_info=True)


def _older(other: Any, created_at: datetime, job_id: str) -> ColumnElement[bool]:
    return or_(other.created_at < created_at, and_(other.created_at == created_at, other.id < job_id))


def holds_slot(owner_id: str, created_at: datetime, job_id: str, cap: int) -> ColumnElement[bool]:
    """True while the queued job ``job_id`` is among its owner's oldest ``cap - running`` queued jobs.
    One SQL condition, so a worker claims a job with a single conditional UPDATE: concurrent claims
    can never put an owner over the cap (a claim of an older job moves it from the queued count to
    the running count, a claim of a newer one adds to the running count)."""
    other = aliased(Job)
    running = (
        select(func.count()).select_from(other).where(other.owner_id == owner_id, other.status.in_(ACTIVE))
    )
    ahead = (
        select(func.count())
        .select_from(other)
        .where(
            other.owner_id == owner_id, other.status == JobStatus.QUEUED, _older(other, created_at, job_id)
        )
    )
    return running.scalar_subquery() + ahead.scalar_subquery() < cap


def active_count(session: Session, owner_id: str) -> int:
    stmt = select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE))
    return int(session.scalar(stmt) or 0)


def slot_holders(session: Session, owner_id: str, cap: int) -> Sequence[Job]:
    """The owner's queued jobs that hold a slot (all of them with no cap), oldest first."""
    stmt = select(Job).where(Job.owner_id == owner_id, Job.status == JobStatus.QUEUED)
    stmt = stmt.order_by(Job.created_at, Job.id)
    if cap:
        free = cap - active_count(session, owner_id)
        if free <= 0:
            return []
        stmt = stmt.limit(free)
    return session.scalars(stmt).all()


def queue_position(session: Session, job: Job, cap: int) -> int | None:
    """1 for the owner's next job to get a slot, 2 for the one after...; None for a job that is not
    waiting for a slot (not queued, or already sent to the workers)."""
    if job.status != JobStatus.QUEUED or not cap:
        return None
    # Both counts in one statement, so they come from one snapshot: counted apart, a job that starts
    # between the two would be counted twice (as queued ahead, then as running) and the position
    # would jump back by one for a moment.
    queued_ahead = and_(Job.status == JobStatus.QUEUED, _older(Job, job.created_at, job.id))
    row = session.execute(
        select(
            func.count().filter(queued_ahead),
            func.count().filter(Job.status.in_(ACTIVE)),
        ).where(Job.owner_id == job.owner_id)
    ).one()
    ahead, active = int(row[0]), int(row[1])
    waiting_ahead = ahead - max(0, cap - active)
    return None if waiting_ahead < 0 else waiting_ahead + 1


def count_by_status(session: Session) -> dict[str, int]:
    """Every owner's jobs, counted by status (for /metrics)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(count) for status, count in rows}


def owners_with_queued_jobs(session: Session) -> list[str]:
    return list(session.scalars(select(Job.owner_id).where(Job.status == JobStatus.QUEUED).distinct()))


def stale_jobs(session: Session, cutoff: datetime, limit: int = 100) -> Sequence[Job]:
    """Running or cancelling jobs whose last heartbeat is older than ``cutoff``, locked; rows another
    process is already handling are skipped (Postgres; SQLite has no row locks and one writer)."""
    last_seen = func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
    stmt = (
        select(Job)
        .where(Job.status.in_(ACTIVE), last_seen < cutoff)
        .order_by(Job.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return session.scalars(stmt).all()
