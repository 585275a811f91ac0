"""Writes a running job's progress, events and heartbeat to the database, and answers the
cancellation check. Progress writes are throttled; stage changes and the last step of a stage are
always written. Status is never written here except through guarded transitions, so a cancel
request from the API is never overwritten."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import utcnow
from app.jobs import repository
from app.jobs.tables import STAGES, Job
from lafter.progress import ProgressEvent

log = logging.getLogger(__name__)

# Share of the whole job each stage is expected to take, for the overall percent.
STAGE_WEIGHTS = {
    "describing": 5.0,
    "encoding_text": 10.0,
    "training_text_classifier": 10.0,
    "adapting": 60.0,
    "evaluating": 10.0,
    "registering": 5.0,
}


def overall_percent(stage: str, fraction: float) -> float:
    done = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
    return min(100.0, done + STAGE_WEIGHTS[stage] * max(0.0, min(1.0, fraction)))


class JobReporter:
    def __init__(
        self,
        job_id: str,
        sessions: sessionmaker[Session],
        *,
        write_interval_s: float = 0.5,
        cancel_poll_s: float = 1.0,
    ) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.write_interval_s = write_interval_s
        self.cancel_poll_s = cancel_poll_s
        self.stage: str = STAGES[0]
        self.started = time.monotonic()
        self._last_write = 0.0
        self._last_cancel_poll = 0.0
        self._cancelled = False

    # --- events --------------------------------------------------------------------------------
    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        log.info("job %s [%s] %s", self.job_id, self.stage, message)
        with self.sessions() as session:
            repository.add_event(
                session, self.job_id, "log", message=message, stage=self.stage, level=level, data=data
            )
            session.commit()

    def metric(self, step: int, data: dict[str, Any]) -> None:
        with self.sessions() as session:
            repository.add_event(session, self.job_id, "metric", stage=self.stage, step=step, data=data)
            session.commit()

    # --- progress ------------------------------------------------------------------------------
    def start_stage(self, stage: str, message: str | None = None) -> None:
        self.stage = stage
        self._write_progress(stage, 0, 0, force=True)
        self.log(message or f"stage {stage} started")

    def _eta(self, percent: float) -> float | None:
        if percent < 1.0:
            return None
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed * (100.0 - percent) / percent)

    def _write_progress(self, stage: str, step: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < self.write_interval_s:
            return
        self._last_write = now
        fraction = step / total if total else 0.0
        percent = overall_percent(stage, fraction)
        with self.sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    stage=stage,
                    step=step,
                    total_steps=total,
                    stage_percent=100.0 * fraction,
                    percent=percent,
                    eta_seconds=self._eta(percent),
                    heartbeat_at=utcnow(),
                )
            )
            session.commit()

    def __call__(self, event: ProgressEvent) -> None:
        """The ``lafter`` progress callback."""
        stage = event.stage if event.stage in STAGE_WEIGHTS else self.stage
        last = event.total > 0 and event.step >= event.total
        self._write_progress(stage, event.step, event.total, force=last)
        if event.metrics:
            self.metric(event.step, {k: v for k, v in event.metrics.items() if _jsonable(v)})
        if event.message:
            self.log(event.message)

    # --- cancellation --------------------------------------------------------------------------
    def should_cancel(self) -> bool:
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_poll < self.cancel_poll_s:
            return False
        self._last_cancel_poll = now
        with self.sessions() as session:
            status = session.scalar(select(Job.status).where(Job.id == self.job_id))
        self._cancelled = status in ("cancelling", "cancelled")
        return self._cancelled


class Heartbeat:
    """Touches ``jobs.heartbeat_at`` every ``interval_s`` from a thread while a job runs, also
    through long steps that report no progress (LLM calls, decoding, a slow first batch), so a
    reaper can tell a live job from one whose worker died."""

    def __init__(self, job_id: str, sessions: sessionmaker[Session], interval_s: float) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions() as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.status.in_(("running", "cancelling")))
                        .values(heartbeat_at=utcnow())
                    )
                    session.commit()
            except Exception:  # a missed beat is not worth killing the job for
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


def _jsonable(value: Any) -> bool:
    if isinstance(value, str | int | float | bool) or value is None:
        return True
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False
