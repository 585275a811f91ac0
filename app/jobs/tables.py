from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow


class JobStatus(StrEnum):
    """A job's life: queued -> running -> succeeded | failed, with cancelling -> cancelled on the way
    (a queued job is cancelled at once). Every change is in ``app.jobs.transitions``."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# A job with a worker: it holds one of its owner's slots (LAFTER_MAX_ACTIVE_JOBS_PER_OWNER), and only
# its current attempt may write to it.
ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)
UNFINISHED = (JobStatus.QUEUED, *ACTIVE)
STAGES = ("describing", "encoding_text", "training_text_classifier", "adapting", "evaluating", "registering")


class Job(Base):
    """The job row is the truth about a job; Celery only carries its id."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key"),
        Index("ix_jobs_owner_status", "owner_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(64), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)

    # What was asked (validated) and what it resolved to.
    base_model: Mapped[str] = mapped_column(String(1000))
    class_names: Mapped[list[Any]] = mapped_column()
    descriptions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Stage 2's recipe ("default" | "paper"). The API always sets it; rows that predate the column
    # read "paper", which is what the worker ran then (50 prompt tokens, no pseudo-label balancing).
    recipe: Mapped[str] = mapped_column(String(16), server_default="paper")
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)

    # Progress, written by the worker.
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    stage_percent: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # Null once the model is deleted (a succeeded job with no model_id: its model was deleted).
    model_id: Mapped[str | None] = mapped_column(String(40), default=None)
    # Events written so far: the ``seq`` of the job's next event is this plus one (see add_event).
    event_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    # Liveness: the attempt number fences every write of a worker; the reaper reads the heartbeat;
    # ``enqueued_at`` is when the job's message was last sent (null: not sent since it was queued).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    """A log line (``kind='log'``) or a metric point (``kind='metric'``). ``seq`` numbers a job's
    events 1, 2, 3... in commit order; it is the event's id and cursor in the API. ``id`` is a global
    sequence and never leaves the database (its gaps would count other owners' events)."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(8))  # log | metric
    level: Mapped[str] = mapped_column(String(8), default="info")
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    message: Mapped[str | None] = mapped_column(Text, default=None)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
