"""Every change of a job's status, in one place: the worker claims, beats, reports and finishes its
attempt; the reaper requeues or fails a job whose worker is gone; the API cancels; the dispatcher
marks a job sent. Each is one conditional UPDATE, or a change of a row locked first, so concurrent
actors (several API processes, a worker that only looked dead) never both win.

A worker's writes are fenced by its attempt number (``attempts`` after its claim): once the reaper
has given the job to another attempt, the old worker's writes match no row. Functions take the
caller's session and never commit, except where noted.

Every change to a final status also writes the job's webhook message, if it has a ``webhook_url``
(``app.webhooks.outbox.enqueue``), in the same transaction: a crash can neither lose a delivery nor
announce a status that was never committed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.jobs import repository
from app.jobs.tables import ACTIVE, TERMINAL, Job, JobStatus
from app.webhooks import outbox


def claim(session: Session, job_id: str, *, cap: int, worker_id: str) -> Job | None:
    """queued -> running for one more attempt, within the owner's cap of running jobs (0: none), and
    commit. Returns the job (detached; its ``attempts`` is this run's fence), or None when it is not
    queued, or another claim won, or its owner has no free slot."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.QUEUED:
        return None
    now = utcnow()
    stmt = update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
    if cap:
        stmt = stmt.where(repository.holds_slot(job.owner_id, job.created_at, job.id, cap))
    claimed = session.execute(
        stmt.values(
            status=JobStatus.RUNNING,
            started_at=job.started_at or now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            stage="describing",
            percent=0.0,
            stage_percent=0.0,
            step=0,
            total_steps=0,
        ).execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.commit()
    session.refresh(job)
    session.expunge(job)
    return job


def _attempt(job_id: str, attempt: int) -> Any:
    """The condition of every write of a worker: still this attempt's live job."""
    return (Job.id == job_id, Job.attempts == attempt, Job.status.in_(ACTIVE))


def report(session: Session, job_id: str, attempt: int, **progress: Any) -> bool:
    """The attempt's progress (stage, step, percent, ETA) and a heartbeat; False once the job is
    no longer this attempt's."""
    done = session.execute(
        update(Job).where(*_attempt(job_id, attempt)).values(**progress, heartbeat_at=utcnow())
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    """False once the job is no longer this attempt's (the reaper took it, or it finished)."""
    return report(session, job_id, attempt)


def live_attempt(session: Session, job_id: str, attempt: int) -> Job | None:
    """The job, locked, if it is still this attempt's running or cancelling job."""
    job = repository.get_any(session, job_id, for_update=True)
    if job is None or job.attempts != attempt or job.status not in ACTIVE:
        return None
    return job


def finish(
    session: Session,
    job: Job,
    status: JobStatus,
    *,
    code: str | None = None,
    message: str | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    """Give a locked job its final status (and error), with a log event saying why."""
    assert status in TERMINAL
    job.status = status
    job.finished_at = utcnow()
    job.eta_seconds = None
    job.heartbeat_at = job.finished_at
    if code is not None:
        job.error_code = code
        job.error_message = message
    repository.add_event(
        session, job.id, "log", stage=job.stage, level=level, message=message or status, data=data
    )
    outbox.enqueue(session, job)


def finish_attempt(
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    completed_steps: int | None = None,
    **kwargs: Any,
) -> bool:
    """``finish`` for the worker of ``attempt``, if the job is still its own; False otherwise."""
    job = live_attempt(session, job_id, attempt)
    if job is None:
        return False
    if completed_steps is not None:
        job.step = completed_steps
        job.metrics = {**(job.metrics or {}), "completed_steps": completed_steps}
    finish(session, job, status, **kwargs)
    return True


def requeue_for_shutdown(session: Session, job_id: str, attempt: int, stage: str, step: int) -> str:
    """A job its worker stopped for the worker's own shutdown goes back to the queue (to be sent
    again by ``dispatch``). Returns "requeued", "cancelled" (a cancel request that came meanwhile is
    honoured) or "skipped" (no longer this attempt's job)."""
    job = live_attempt(session, job_id, attempt)
    if job is None:
        return "skipped"
    if job.status == JobStatus.CANCELLING:
        finish(session, job, JobStatus.CANCELLED, message=f"cancelled during {stage} after {step} steps")
        return "cancelled"
    job.status = JobStatus.QUEUED
    job.enqueued_at = None
    job.worker_id = None
    job.eta_seconds = None
    repository.add_event(
        session,
        job.id,
        "log",
        stage=stage,
        level="warning",
        message=f"the worker shut down during {stage} after {step} steps; the job is queued "
        "again and resumes from its checkpoint",
        data={"step": step, "attempt": attempt},
    )
    return "requeued"


def cancel(session: Session, job: Job) -> JobStatus | None:
    """The owner's cancel of a locked unfinished job: a queued job is cancelled at once (its message,
    if any, is skipped); a running one becomes ``cancelling`` and its worker stops between steps.
    Returns the new status, or None when there was nothing to change (already cancelling)."""
    now = utcnow()
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.CANCELLED
        job.finished_at = now
        job.cancel_requested_at = now
        job.eta_seconds = None
        repository.add_event(session, job.id, "log", message="cancelled before it started")
        outbox.enqueue(session, job)
        return JobStatus.CANCELLED
    if job.status == JobStatus.RUNNING:
        job.status = JobStatus.CANCELLING
        job.cancel_requested_at = now
        repository.add_event(
            session, job.id, "log", stage=job.stage, message="cancel requested", data={"step": job.step}
        )
        return JobStatus.CANCELLING
    return None


def mark_sent(session: Session, job: Job, now: datetime) -> bool:
    """Stamp ``enqueued_at`` of a queued job about to be sent, unless another dispatcher changed it
    since ``job`` was read (then that one sends it): True for the one dispatcher that sends."""
    stamp = Job.enqueued_at.is_(None) if job.enqueued_at is None else Job.enqueued_at == job.enqueued_at
    won = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED, stamp).values(enqueued_at=now)
    )
    return bool(won.rowcount == 1)  # type: ignore[attr-defined]


def unmark_sent(session: Session, job_id: str, stamp: datetime) -> None:
    """Nothing was sent after ``mark_sent`` (the broker failed): the job is not in the broker."""
    session.execute(update(Job).where(Job.id == job_id, Job.enqueued_at == stamp).values(enqueued_at=None))


def requeue_or_fail(
    session: Session, job: Job, *, cutoff: datetime, now: datetime, max_attempts: int
) -> str | None:
    """The reaper's verdict on a job whose worker stopped beating before ``cutoff``: queued again
    for another attempt while it has attempts left, else failed with ``worker_lost``; a
    ``cancelling`` job ends cancelled. Applied only if the job is as it was read and still silent;
    returns "requeued", "failed" or "cancelled", or None when another process (or the worker, come
    back) got there first."""
    last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
    who = f"the worker running it ({job.worker_id or 'unknown'}) stopped answering (last heartbeat {last})"
    data = {
        "reason": "worker_lost",
        "worker_id": job.worker_id,
        "attempt": job.attempts,
        "last_heartbeat": last,
    }
    values: dict[str, Any]
    if job.status == JobStatus.CANCELLING:
        outcome, level, message = "cancelled", "warning", f"cancelled: {who} before it could stop"
        values = {"status": JobStatus.CANCELLED, "finished_at": now, "eta_seconds": None}
    elif job.attempts < max_attempts:
        outcome, level = "requeued", "warning"
        message = (
            f"{who}; queued again for attempt {job.attempts + 1} of {max_attempts}, "
            "resuming from its last checkpoint"
        )
        values = {
            "status": JobStatus.QUEUED,
            "worker_id": None,
            "heartbeat_at": None,
            "enqueued_at": None,
            "eta_seconds": None,
        }
    else:
        outcome, level = "failed", "error"
        message = (
            f"{who} on each of its {job.attempts} attempt(s) (LAFTER_MAX_JOB_ATTEMPTS="
            f"{max_attempts}), last in stage {job.stage or 'unknown'}. A worker that dies "
            "repeatedly on one job usually runs out of memory: try a smaller batch_size or a smaller "
            "base model, check the worker's logs, then submit the job again"
        )
        values = {
            "status": JobStatus.FAILED,
            "finished_at": now,
            "eta_seconds": None,
            "error_code": "worker_lost",
            "error_message": message,
        }
    done = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status == job.status,
            Job.attempts == job.attempts,
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    repository.add_event(session, job.id, "log", stage=job.stage, level=level, message=message, data=data)
    if outcome != "requeued":
        session.refresh(job)  # the UPDATE above bypassed the object: the message reads the row
        outbox.enqueue(session, job)
    return outcome


def detach_model(session: Session, job_id: str, model_id: str) -> None:
    """The job's model was deleted: the job no longer names it, and its events say so."""
    session.execute(
        update(Job).where(Job.id == job_id).values(model_id=None).execution_options(synchronize_session=False)
    )
    repository.add_event(session, job_id, "log", message=f"model {model_id} was deleted")
