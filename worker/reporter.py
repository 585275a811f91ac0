"""Writes a running job's progress, events and heartbeat to the database, and tells the pipeline
when to stop. Progress writes are throttled; stage changes and the last step of a stage are always
written. Status is never written here, so a cancel request from the API is never overwritten, and
every write is fenced by the attempt number: a worker whose job was given to another attempt (the
reaper took it for lost) can no longer change it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.core.broker import CancelSignals
from app.core.settings import Settings
from app.jobs import repository, transitions
from app.jobs.tables import ACTIVE, STAGES, JobStatus
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


# Stages whose step count must be known before the job's ETA is: the long one. The stages after it
# (evaluating, registering) are short and not counted; the ones before it are measured as they run.
COUNTED = ("adapting",)


class EtaEstimator:
    """The seconds a job has left: the steps left in its current stage at that stage's measured rate,
    plus the steps of the later stages whose count is known (``plan``) at their rate. The rate is
    measured from the stage's first reported step (the time before it, decoding images or building a
    model, is not a step) to its latest, so at a steady rate the ETA shrinks with the clock.
    ``None`` (unknown) until the current stage has two measured points, and while a long stage ahead
    (``COUNTED``: stage 2, whose step count is resolved only when it starts) has no step count."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self.stage: str | None = None
        self.step = 0
        self.total = 0
        self.anchor: tuple[float, int] | None = None  # (time, step) of the stage's first step seen
        self.latest: tuple[float, int] | None = None
        self.plan: dict[str, int] = {}  # stage -> its step count, once known

    def now(self) -> float:
        return self._clock() if self._clock is not None else time.monotonic()

    def observe(self, stage: str, step: int, total: int) -> None:
        now = self.now()
        if stage != self.stage:
            self.stage, self.anchor, self.latest = stage, None, None
        self.step, self.total = step, total
        if total:
            self.plan[stage] = total
        if step <= 0:
            return
        if self.anchor is None:
            self.anchor = (now, step)
        elif step > self.anchor[1]:
            self.latest = (now, step)

    def seconds_per_step(self) -> float | None:
        if self.anchor is None or self.latest is None:
            return None
        (t0, s0), (t1, s1) = self.anchor, self.latest
        return max(0.0, (t1 - t0) / (s1 - s0))

    def estimate(self) -> float | None:
        if self.stage is None or self.stage not in STAGES:
            return None
        later = STAGES[STAGES.index(self.stage) + 1 :]
        if any(stage not in self.plan for stage in later if stage in COUNTED):
            return None
        rate = self.seconds_per_step()
        if rate is None:
            return None
        left = max(0, self.total - self.step) * rate
        # Later counted stages at the current rate: a stand-in until they measure their own.
        left += sum(self.plan[stage] * rate for stage in later if stage in COUNTED)
        return left


class JobReporter:
    def __init__(
        self,
        job_id: str,
        sessions: sessionmaker[Session],
        *,
        attempt: int,
        write_interval_s: float = 0.5,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.sessions = sessions
        self.write_interval_s = write_interval_s
        self.stage: str = STAGES[0]
        self._last_write = 0.0
        self.eta = EtaEstimator()

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

    def _write_progress(self, stage: str, step: int, total: int, *, force: bool = False) -> None:
        self.eta.observe(stage, step, total)  # every step, written or not: the rate's end points
        now = time.monotonic()
        if not force and now - self._last_write < self.write_interval_s:
            return
        self._last_write = now
        fraction = step / total if total else 0.0
        percent = overall_percent(stage, fraction)
        with self.sessions() as session:
            transitions.report(
                session,
                self.job_id,
                self.attempt,
                stage=stage,
                step=step,
                total_steps=total,
                stage_percent=100.0 * fraction,
                percent=percent,
                eta_seconds=self.eta.estimate(),
            )
            session.commit()

    def __call__(self, event: ProgressEvent) -> None:
        """The ``lafter`` progress callback."""
        if event.starts_stage:
            # The stage may have been started here already, with what the worker did first (loading
            # the base model, decoding the images).
            if event.stage != self.stage:
                self.start_stage(event.stage, event.message)
            return
        stage = event.stage if event.stage in STAGE_WEIGHTS else self.stage
        last = event.total > 0 and event.step >= event.total
        self._write_progress(stage, event.step, event.total, force=last)
        if event.metrics:
            point = {k: v for k, v in event.metrics.items() if _jsonable(v)}
            if event.total:
                # A metric point says where the job is, so an event stream alone can draw progress.
                point.setdefault("total_steps", event.total)
                point.setdefault("percent", round(overall_percent(stage, event.step / event.total), 2))
            self.metric(event.step, point)
        if event.message:
            self.log(event.message, level=event.level)

    def step(self, step: int, total: int) -> None:
        """A training step finished: the row's ``step`` follows it (throttled), between the library's
        less frequent progress events."""
        self._write_progress(self.stage, step, total, force=step >= total)


class JobWatch:
    """Watches a running job from a thread, so the training loop's check is a flag read:

    - writes ``heartbeat_at`` every ``LAFTER_HEARTBEAT_INTERVAL_S``, also through long steps that
      report no progress (LLM calls, decoding, a slow first batch), so the reaper can tell a live
      job from one whose worker died;
    - ``cancel_requested``: a cancel signal arrived (Redis pub/sub, at once), or the status read every
      ``LAFTER_CANCEL_POLL_INTERVAL_S`` says ``cancelling`` (any broker);
    - ``lost``: the job is no longer this attempt's (the reaper re-queued or failed it while this
      worker was unresponsive): stop, and write nothing more.
    """

    def __init__(
        self, job_id: str, attempt: int, sessions: sessionmaker[Session], settings: Settings
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.sessions = sessions
        self.beat_s = settings.heartbeat_interval_s
        self.poll_s = settings.cancel_poll_interval_s
        self.redis_url = settings.broker_url
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{job_id}", daemon=True)

    def should_stop(self) -> bool:
        """The ``lafter`` cancel check: cheap enough for every step."""
        return self.cancel_requested.is_set() or self.lost.is_set()

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        signals = CancelSignals(self.job_id, self.redis_url)
        try:
            next_poll = next_beat = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self.beat_s
                if now >= next_poll:
                    self._poll()
                    next_poll = now + self.poll_s
                if signals.wait(min(next_poll, next_beat) - time.monotonic(), self._stop):
                    log.info("job %s: cancel signal received", self.job_id)
                    self.cancel_requested.set()
        finally:
            signals.close()

    def _beat(self) -> None:
        try:
            with self.sessions() as session:
                mine = transitions.heartbeat(session, self.job_id, self.attempt)
                session.commit()
            if not mine:
                self._lose()
        except Exception:  # a missed beat is not worth killing the job for
            log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def _poll(self) -> None:
        try:
            with self.sessions() as session:
                row = repository.status_of(session, self.job_id)
        except Exception:
            log.warning("status read for job %s failed", self.job_id, exc_info=True)
            return
        if row is None or row[1] != self.attempt or row[0] not in ACTIVE:
            self._lose()
        elif row[0] == JobStatus.CANCELLING:
            self.cancel_requested.set()

    def _lose(self) -> None:
        if not self.lost.is_set():
            log.warning("job %s is no longer attempt %d's; stopping", self.job_id, self.attempt)
            self.lost.set()


def _jsonable(value: Any) -> bool:
    if isinstance(value, str | int | float | bool) or value is None:
        return True
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False
