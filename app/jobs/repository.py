from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.jobs.tables import Job, JobEvent


def get(session: Session, owner_id: str, job_id: str, *, for_update: bool = False) -> Job | None:
    stmt = select(Job).where(Job.id == job_id, Job.owner_id == owner_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def by_idempotency_key(session: Session, owner_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def list_query(owner_id: str, status: str | None) -> Select[Any]:
    stmt = select(Job).where(Job.owner_id == owner_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return stmt


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    *,
    message: str | None = None,
    stage: str | None = None,
    step: int | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job_id, kind=kind, message=message, stage=stage, step=step, level=level, data=data or {}
    )
    session.add(event)
    return event


def events(session: Session, job_id: str, after: int | None, limit: int) -> Sequence[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    return session.scalars(stmt.order_by(JobEvent.id).limit(limit)).all()
