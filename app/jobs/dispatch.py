"""Which queued jobs go to the workers, and when. An owner's queued jobs run oldest first, at most
``LAFTER_MAX_ACTIVE_JOBS_PER_OWNER`` at a time: the oldest queued jobs that fit in the owner's free
slots are sent, the others wait (not in the broker) with a ``queue_position``. A job that holds a slot
but whose message the broker no longer has (``app.core.broker``: markers) is sent again.

``dispatch`` runs after a job is created or cancelled (``after_commit``), when a worker finishes a
job, and in every reaper pass, which catches whatever those missed. A duplicate message is harmless:
the worker claims a job with a conditional UPDATE and drops any message whose job it cannot claim."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from app.core import broker
from app.core.db import after_commit, get_sessionmaker, utcnow
from app.core.settings import Settings, get_settings
from app.jobs import repository, transitions

log = logging.getLogger(__name__)


def dispatch(
    sessions: sessionmaker[Session], settings: Settings, owner_id: str, *, min_age_s: float = 0.0
) -> list[str]:
    """Send the owner's slot-holding queued jobs that have no message in the broker, and those sent
    more than ``LAFTER_REQUEUE_AFTER_S`` ago. ``min_age_s`` leaves alone a job sent or created that
    recently (its marker may not be written yet, or its creator is about to send it). ``enqueued_at``
    is stamped on the jobs sent, and only on them: a send that fails takes its stamp back. Returns
    the ids sent; raises when the broker cannot be reached (the jobs stay queued and the reaper sends
    them once it is back)."""
    now = utcnow()
    chosen: list[str] = []
    with sessions() as session:
        holders = repository.slot_holders(session, owner_id, settings.max_active_jobs_per_owner)
        if not holders:
            return []
        present = broker.markers(settings).present([j.id for j in holders])
        for job in holders:
            age = None if job.enqueued_at is None else (now - job.enqueued_at).total_seconds()
            if job.id in present:
                due = age is None or age >= settings.requeue_after_s
            else:
                # Never sent (or its send failed): one created less than ``min_age_s`` ago is left
                # to the request that created it, which sends it right after its commit.
                since = age if age is not None else (now - job.created_at).total_seconds()
                due = since >= min_age_s
            # Only one dispatcher (of several API processes and workers) sends it.
            if due and transitions.mark_sent(session, job, now):
                chosen.append(job.id)
        session.commit()
    for i, job_id in enumerate(chosen):
        try:
            broker.send_job(job_id, settings)  # after the commit: the worker must see the row
        except Exception:
            with sessions() as session:
                for unsent in chosen[i:]:
                    transitions.unmark_sent(session, unsent, now)
                session.commit()
            raise
        log.info("job %s (owner %s) sent to the workers", job_id, owner_id)
    return chosen


def dispatch_later(session: Session, owner_id: str) -> None:
    """``dispatch`` the owner's jobs once ``session`` commits (a job was created, or one of its
    slots freed): the one way the API hands jobs to the workers."""

    def send() -> None:
        dispatch(get_sessionmaker(), get_settings(), owner_id)

    after_commit(session, send)
