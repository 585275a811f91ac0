from __future__ import annotations

import logging

from app.core.broker import RUN_JOB_TASK, message_taken
from app.core.db import get_sessionmaker
from app.core.settings import get_settings
from app.core.storage import get_storage
from worker.celery_app import app
from worker.pipeline import run_job as run_pipeline

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Takes a job id, never an object: the row is read fresh and claimed with a conditional UPDATE,
    so a redelivered or duplicate message does no harm."""
    message_taken(job_id)  # from now on the reaper knows this message is out of the broker
    outcome = run_pipeline(job_id, get_settings(), get_sessionmaker(), get_storage())
    log.info("job %s: %s", job_id, outcome)
    return outcome
