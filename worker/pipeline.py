"""A job from its message to its final status: claim -> run (``worker.run``) -> register
(``worker.registration``), and the final status of a run that did not succeed.

Safe to run for any message, any number of times: it claims the job with one conditional UPDATE
(queued -> running, within its owner's cap) and does nothing when it cannot (finished, running
elsewhere, cancelled, or waiting for a slot). A job re-run after its worker died (the reaper queued
it again) resumes: descriptions and text embeddings come from the database caches, and stage 2 (with
the stage-1 head it started from) from the checkpoint written every ``LAFTER_CHECKPOINT_EVERY_S``.
Every write is fenced by the attempt number, so a worker that lost its job cannot touch it."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from app.core.ids import new_id
from app.core.settings import Settings
from app.core.storage import BlobStorage
from app.jobs import repository, transitions
from app.jobs.dispatch import dispatch
from app.jobs.tables import TERMINAL, Job, JobStatus
from lafter.errors import Cancelled, LafterError
from worker.registration import register
from worker.reporter import JobReporter, JobWatch
from worker.run import StageError, execute

log = logging.getLogger(__name__)

# Set when this worker process is asked to stop (SIGTERM or SIGINT: Celery's ``worker_shutting_down``,
# connected in worker/celery_app.py). A running job stops before its next step, stage 2 writing a
# checkpoint of its last step first, and is queued again to resume.
SHUTDOWN = threading.Event()


def request_shutdown(*_args: object, **_kwargs: object) -> None:
    """The ``worker_shutting_down`` receiver (it runs in a signal handler: only sets a flag)."""
    SHUTDOWN.set()


def _claim(sessions: sessionmaker[Session], settings: Settings, job_id: str) -> Job | None:
    cap = settings.max_active_jobs_per_owner
    with sessions() as session:
        job = transitions.claim(session, job_id, cap=cap, worker_id=f"{socket.gethostname()}:{os.getpid()}")
    if job is None:
        # Finished, cancelled, running under another worker (a redelivered or duplicate message), or
        # its owner has no free slot: the row says what to do, and that is nothing.
        log.info(
            "job %s was not claimed (not queued, taken by another message, or its owner has no free "
            "slot: LAFTER_MAX_ACTIVE_JOBS_PER_OWNER=%d); nothing to do for this message",
            job_id,
            cap,
        )
    return job


def run_job(job_id: str, settings: Settings, sessions: sessionmaker[Session], storage: BlobStorage) -> str:
    """Run one job to a final status and return it. Never raises for a job's own failure."""
    if SHUTDOWN.is_set():
        # A message taken while this worker stops: left queued, the reaper sends it again.
        log.info("job %s: this worker is shutting down; leaving the job queued", job_id)
        return "skipped"
    job = _claim(sessions, settings, job_id)
    if job is None:
        return "skipped"
    attempt = job.attempts
    reporter = JobReporter(
        job_id, sessions, attempt=attempt, write_interval_s=settings.progress_write_interval_s
    )
    watch = JobWatch(job_id, attempt, sessions, settings)
    outcome = "skipped"
    final: dict[str, Any] | None = None  # how the job ended, when it did not succeed
    try:
        with watch:
            result = execute(job, settings, sessions, storage, reporter, watch, SHUTDOWN)
            outcome = register(job, result, sessions, reporter)
    except Cancelled as exc:
        stage = exc.stage or reporter.stage
        if SHUTDOWN.is_set() and not watch.cancel_requested.is_set() and not watch.lost.is_set():
            # Stopped for this worker's shutdown, not by its owner: the job runs again elsewhere or
            # after the restart, stage 2 from the checkpoint written before it stopped.
            with sessions() as session:
                outcome = transitions.requeue_for_shutdown(session, job_id, attempt, stage, exc.step)
                session.commit()
            if outcome == "requeued":
                log.warning(
                    "job %s: stopped for the worker's shutdown at %s step %d; queued again",
                    job_id,
                    stage,
                    exc.step,
                )
        else:
            final = {"status": JobStatus.CANCELLED, "completed_steps": exc.step}
            final["message"] = f"cancelled during {stage} after {exc.step} steps"
    except StageError as exc:
        final = {"status": JobStatus.FAILED, "code": exc.code, "message": exc.message, "level": "error"}
    except LafterError as exc:
        final = {
            "status": JobStatus.FAILED,
            "code": exc.code,
            "message": f"{reporter.stage}: {exc}",
            "level": "error",
        }
    except SoftTimeLimitExceeded:
        final = {
            "status": JobStatus.FAILED,
            "code": "time_limit_exceeded",
            "message": f"the job ran past LAFTER_JOB_TIME_LIMIT_S={settings.job_time_limit_s}s "
            f"in {reporter.stage}; lower epochs or max_steps",
            "level": "error",
        }
    except Exception:
        # What went wrong stays in the worker's log, found by the error id: an exception's text can
        # hold SQL, parameters, server paths or another owner's data, so the job shows none of it.
        error_id = new_id("err")
        log.exception("job %s failed unexpectedly in %s (error id %s)", job_id, reporter.stage, error_id)
        final = {
            "status": JobStatus.FAILED,
            "code": "internal_error",
            "message": f"unexpected internal error in stage {reporter.stage} (error id {error_id}); "
            "the service's operator can look it up in the worker log",
            "level": "error",
            "data": {"error_id": error_id},
        }
    # The exception (and its traceback, which held the frames that held the images, the model
    # state and the optimiser) is gone once its ``except`` block ends: free that memory now, before
    # this worker takes its next job.
    memory = release_memory()
    if final is not None:
        if watch.lost.is_set():
            log.warning("job %s: attempt %d lost the job to the reaper; leaving it alone", job_id, attempt)
            return "lost"
        status = final.pop("status")
        data = {**memory, **final.pop("data", {})}
        with sessions() as session:
            done = transitions.finish_attempt(session, job_id, attempt, status, data=data or None, **final)
            session.commit()
        outcome = str(status) if done else "skipped"
    if outcome in TERMINAL:
        repository.delete_checkpoint(storage, job_id)
    # Its slot is free: the owner's next waiting job goes to the workers (a stopping worker leaves
    # that, and its requeued job, to the reaper, rather than send messages it could take itself).
    if SHUTDOWN.is_set():
        return outcome
    try:
        dispatch(sessions, settings, job.owner_id)
    except Exception:  # the reaper's next pass does it
        log.warning("could not dispatch the next job of owner %s", job.owner_id, exc_info=True)
    return outcome


def release_memory() -> dict[str, int]:
    """Collect garbage (whatever a reference cycle still holds) and give the CUDA caching
    allocator's free blocks back to the driver, so the next job, or another process on this GPU,
    gets the memory. Returns the CUDA memory still allocated and reserved, when CUDA is in use."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        return {
            "cuda_allocated_bytes": int(torch.cuda.memory_allocated()),
            "cuda_reserved_bytes": int(torch.cuda.memory_reserved()),
        }
    return {}
