"""Housekeeping of the job queue, so that no job is lost with a worker or with the broker.

Each API process runs ``run_once`` every ``LAFTER_REAPER_INTERVAL_S`` from a thread (``start_reaper``,
started by the FastAPI lifespan). Several processes may run it at once: every change is a
conditional UPDATE (and stale rows are locked with SKIP LOCKED on Postgres), so exactly one wins.

- **Lost workers.** A ``running`` or ``cancelling`` job whose heartbeat is older than
  ``LAFTER_HEARTBEAT_TIMEOUT_S`` lost its worker (killed, out of memory, machine gone). It is queued
  again, to resume from its last stage-2 checkpoint, while it has attempts left
  (``LAFTER_MAX_JOB_ATTEMPTS``), and fails with ``worker_lost`` after that. A ``cancelling`` job ends
  ``cancelled`` (``transitions.requeue_or_fail``).
- **Slots and lost messages**: ``dispatch`` for every owner with queued jobs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.core.db import get_sessionmaker, utcnow
from app.core.settings import Settings
from app.core.storage import BlobStorage, get_storage
from app.jobs import repository, transitions
from app.jobs.dispatch import dispatch

log = logging.getLogger(__name__)


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
            outcome = transitions.requeue_or_fail(
                session, job, cutoff=cutoff, now=now, max_attempts=settings.max_job_attempts
            )
            if outcome is not None:
                reaped.append(Reaped(job.id, job.owner_id, outcome))
                log.warning("job %s: its worker stopped answering; %s", job.id, outcome)
        session.commit()
    return reaped


def run_once(sessions: sessionmaker[Session], settings: Settings, storage: BlobStorage | None = None) -> None:
    """One housekeeping pass: reap lost workers, then send what should be in the broker."""
    reaped = reap(sessions, settings)
    for r in reaped:
        if r.outcome != "requeued" and storage is not None:
            repository.delete_checkpoint(storage, r.job_id)
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
