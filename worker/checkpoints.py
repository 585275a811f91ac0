"""A job's stage-2 checkpoint in blob storage: written while it trains (``CheckpointWriter``, the
``run_lafter`` checkpoint hook), read when a later attempt resumes it (``load``), deleted when the job
ends (``app.jobs.repository.delete_checkpoint``). The format is the library's (``lafter.checkpoint.RunCheckpoint``); the worker adds only
``inputs``, a digest of what the job was made from, so a run on other images or settings never
resumes it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from app.core.settings import Settings
from app.core.storage import BlobStorage
from app.jobs import repository as jobs
from app.jobs.tables import Job
from lafter.checkpoint import RunCheckpoint
from worker.reporter import JobReporter

log = logging.getLogger(__name__)


def inputs_digest(job: Job, train_keys: list[str]) -> str:
    """What a checkpoint was made from: a run on other images or settings must not resume it."""
    fields = {
        "base_model": job.base_model,
        "class_names": list(job.class_names),
        "descriptions": job.descriptions,
        "recipe": job.recipe,
        "hyperparameters": job.hyperparameters,
        "seed": job.seed,
        "images": train_keys,  # content-addressed keys
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class CheckpointWriter:
    """The ``run_lafter`` checkpoint hook: after every step it moves the row's progress, and every
    ``LAFTER_CHECKPOINT_EVERY_S`` seconds or ``LAFTER_CHECKPOINT_EVERY_STEPS`` steps (and at the last
    step, so a crash while evaluating does not redo stage 2) it stores the run's state under the
    job in blob storage."""

    def __init__(
        self, storage: BlobStorage, settings: Settings, reporter: JobReporter, job_id: str, inputs: str
    ) -> None:
        self.storage = storage
        self.reporter = reporter
        self.key = jobs.checkpoint_key(job_id)
        self.inputs = inputs
        self.every_s = settings.checkpoint_every_s
        self.every_steps = settings.checkpoint_every_steps
        self.last = time.monotonic()
        # The latest step and its snapshot, for ``flush`` (the snapshot reads the live state, which
        # is that step's until the next one runs); the step last stored.
        self.latest: tuple[int, int, Callable[[], RunCheckpoint]] | None = None
        self.saved_step = -1

    def __call__(self, step: int, total: int, snapshot: Callable[[], RunCheckpoint]) -> None:
        self.reporter.step(step, total)
        self.latest = (step, total, snapshot)
        if not (self.every_s or self.every_steps):
            return
        now = time.monotonic()
        due = (
            step >= total
            or (self.every_steps and step % self.every_steps == 0)
            or (self.every_s and now - self.last >= self.every_s)
        )
        if due:
            self._save(step, total, snapshot)

    def flush(self) -> None:
        """Store the latest step's state now, unless it is stored already (the worker is stopping:
        called between two steps, by the cancel check)."""
        if self.latest is not None and self.latest[0] != self.saved_step:
            self._save(*self.latest)

    def _save(self, step: int, total: int, snapshot: Callable[[], RunCheckpoint]) -> None:
        data = replace(snapshot(), inputs=self.inputs).to_bytes()
        try:
            self.storage.put(self.key, data)
        except Exception:  # training goes on; a re-run would start from an older checkpoint
            log.warning("could not store the checkpoint of job %s", self.reporter.job_id, exc_info=True)
            return
        self.last = time.monotonic()
        self.saved_step = step
        self.reporter.log(f"checkpoint at step {step} of {total}", data={"checkpoint_step": step})


def load(storage: BlobStorage, job_id: str, inputs: str) -> RunCheckpoint | None:
    """The job's checkpoint if there is one and it was made from these inputs, else None."""
    key = jobs.checkpoint_key(job_id)
    try:
        if not storage.exists(key):
            return None
        saved = RunCheckpoint.from_bytes(storage.get(key))
    except Exception:  # an unreadable checkpoint costs the time it saved, nothing else
        log.warning("job %s: could not read its checkpoint; starting over", job_id, exc_info=True)
        return None
    if saved.inputs != inputs or saved.text is None:
        log.warning("job %s: the checkpoint is for other inputs; starting over", job_id)
        return None
    return saved
