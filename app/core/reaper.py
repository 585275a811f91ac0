"""Housekeeping of the job queue, so that no job is lost with a worker or with the broker.

Each API process runs ``run_once`` every ``LAFTER_REAPER_INTERVAL_S`` from a thread (``start_reaper``,
started by the FastAPI lifespan). Several processes may run it at once: every change is a
conditional UPDATE (and stale rows are locked with SKIP LOCKED on Postgres), so exactly one wins.

- **Lost workers.** A ``running`` or ``cancelling`` job whose heartbeat is older than
  ``LAFTER_HEARTBEAT_TIMEOUT_S`` lost its worker (killed, out of memory, machine gone). It is queued
  again, to resume from its last stage-2 checkpoint, while it has attempts left
  (``LAFTER_MAX_JOB_ATTEMPTS``), and fails with ``worker_lost`` after that. A ``cancelling`` job ends
  ``cancelled``.
- **Slots and lost messages** (``dispatch``). An owner's queued jobs run oldest first, at most
  ``LAFTER_MAX_ACTIVE_JOBS_PER_OWNER`` at a time: the oldest queued jobs that fit in the owner's free
  slots are sent to the workers, the others wait (not in the broker) with a ``queue_position``. A
  job that holds a slot but whose message the broker no longer has (see ``app.core.queue``: markers)
  is sent again. A worker calls ``dispatch`` when a job finishes, the cancel endpoint when a queued
  job is cancelled, and this loop catches whatever those missed.

A duplicate message is harmless: the task claims a job with a conditional UPDATE (queued -> running,
within the owner's cap) and drops any message whose job it cannot claim.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from app.core import queue
from app.core.db import get_sessionmaker, utcnow
from app.core.settings import Settings, get_settings
from app.core.storage import BlobStorage, get_storage
from app.jobs import repository
from app.jobs.tables import Job

log = logging.getLogger(__name__)


# --- sending jobs to the workers ---------------------------------------------------------------


def dispatch(
    sessions: sessionmaker[Session], settings: Settings, owner_id: str, *, min_age_s: float = 0.0
) -> list[str]:
    """Send the owner's slot-holding queued jobs that have no message in the broker, and those sent
    more than ``LAFTER_REQUEUE_AFTER_S`` ago. ``min_age_s`` leaves alone a job sent that recently
    (its marker may not be written yet). Returns the ids sent."""
    now = utcnow()
    chosen: list[str] = []
    with sessions() as session:
        holders = repository.slot_holders(session, owner_id, settings.max_active_jobs_per_owner)
        if not holders:
            return []
        present = queue.markers(settings).present([j.id for j in holders])
        for job in holders:
            age = None if job.enqueued_at is None else (now - job.enqueued_at).total_seconds()
            if job.id in present:
                due = age is None or age >= settings.requeue_after_s
            else:
                due = age is None or age >= min_age_s
            if not due:
                continue
            # Only one dispatcher (of several API processes and workers) sends it.
            won = session.execute(
                update(Job)
                .where(
                    Job.id == job.id,
                    Job.status == "queued",
                    Job.enqueued_at.is_(None)
                    if job.enqueued_at is None
                    else Job.enqueued_at == job.enqueued_at,
                )
                .values(enqueued_at=now)
            )
            if won.rowcount == 1:  # type: ignore[attr-defined]
                chosen.append(job.id)
        session.commit()
    for job_id in chosen:
        queue.send_job(job_id, settings)  # after the commit: the worker must see the row
        log.info("job %s (owner %s) sent to the workers", job_id, owner_id)
    return chosen


def dispatch_owner_of(job_id: str) -> list[str]:
    """``dispatch`` for the owner of ``job_id`` (the create path, through ``queue.enqueue_job``)."""
    sessions = get_sessionmaker()
    with sessions() as session:
        job = session.get(Job, job_id)
        owner = job.owner_id if job is not None else None
    return [] if owner is None else dispatch(sessions, get_settings(), owner)


# --- lost workers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaped:
    job_id: str
    owner_id: str
    outcome: str  # "requeued" | "failed" | "cancelled"


def reap(sessions: sessionmaker[Session], settings: Settings) -> list[Reaped]:
    """Requeue, fail or cancel the jobs whose worker stopped sending heartbeats."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
    reaped: list[Reaped] = []
    with sessions() as session:
        for job in repository.stale_jobs(session, cutoff):
            outcome, values, event = _verdict(job, settings, now)
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
                continue  # another process got there first, or the worker came back
            repository.add_event(session, job.id, "log", stage=job.stage, **event)
            reaped.append(Reaped(job.id, job.owner_id, outcome))
            log.warning("job %s: %s", job.id, event["message"])
        session.commit()
    return reaped


def _verdict(job: Job, settings: Settings, now: datetime) -> tuple[str, dict[str, object], dict[str, Any]]:
    last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
    who = f"the worker running it ({job.worker_id or 'unknown'}) stopped answering (last heartbeat {last})"
    data = {
        "reason": "worker_lost",
        "worker_id": job.worker_id,
        "attempt": job.attempts,
        "last_heartbeat": last,
    }
    if job.status == "cancelling":
        message = f"cancelled: {who} before it could stop"
        values = {"status": "cancelled", "finished_at": now, "eta_seconds": None}
        return "cancelled", values, {"level": "warning", "message": message, "data": data}
    if job.attempts < settings.max_job_attempts:
        message = (
            f"{who}; queued again for attempt {job.attempts + 1} of {settings.max_job_attempts}, "
            "resuming from its last checkpoint"
        )
        values = {
            "status": "queued",
            "worker_id": None,
            "heartbeat_at": None,
            "enqueued_at": None,
            "eta_seconds": None,
        }
        return "requeued", values, {"level": "warning", "message": message, "data": data}
    message = (
        f"{who} on each of its {job.attempts} attempt(s) (LAFTER_MAX_JOB_ATTEMPTS="
        f"{settings.max_job_attempts}), last in stage {job.stage or 'unknown'}. A worker that dies "
        "repeatedly on one job usually runs out of memory: try a smaller batch_size or a smaller "
        "base model, check the worker's logs, then submit the job again"
    )
    values = {
        "status": "failed",
        "finished_at": now,
        "eta_seconds": None,
        "error_code": "worker_lost",
        "error_message": message,
    }
    return "failed", values, {"level": "error", "message": message, "data": data}


# --- the loop ------------------------------------------------------------------------------------


def run_once(sessions: sessionmaker[Session], settings: Settings, storage: BlobStorage | None = None) -> None:
    """One housekeeping pass: reap lost workers, then send what should be in the broker."""
    reaped = reap(sessions, settings)
    for r in reaped:
        if r.outcome != "requeued" and storage is not None:
            try:
                storage.delete(repository.checkpoint_key(r.job_id))
            except Exception:
                log.warning("could not delete the checkpoint of job %s", r.job_id, exc_info=True)
    with sessions() as session:
        owners = repository.owners_with_queued_jobs(session)
    # A job sent moments ago may not have its marker yet: leave it to the next pass.
    min_age = max(1.0, 2 * settings.reaper_interval_s)
    for owner in owners:
        try:
            dispatch(sessions, settings, owner, min_age_s=min_age)
        except Exception:
            log.warning("could not dispatch the queued jobs of owner %s", owner, exc_info=True)


class Reaper:
    """``run_once`` every ``interval_s`` in a daemon thread, until ``stop``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.interval_s = settings.reaper_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lafter-reaper", daemon=True)

    def start(self) -> Reaper:
        if self.interval_s > 0:
            self._thread.start()
            log.info(
                "reaper every %.1fs: heartbeat timeout %.0fs, %d attempts, %s active jobs per owner",
                self.interval_s,
                self.settings.heartbeat_timeout_s,
                self.settings.max_job_attempts,
                self.settings.max_active_jobs_per_owner or "unlimited",
            )
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        sessions = get_sessionmaker()
        while not self._stop.is_set():
            try:
                run_once(sessions, self.settings, get_storage())
            except Exception:  # the database or broker is down: try again next time
                log.warning("reaper pass failed", exc_info=True)
            self._stop.wait(self.interval_s)


def start_reaper(settings: Settings) -> Reaper:
    """Start the loop (a no-op object when ``LAFTER_REAPER_INTERVAL_S`` is 0)."""
    return Reaper(settings).start()
