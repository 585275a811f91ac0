"""The outbox of webhook messages: written with a job's final status (``app.jobs.transitions``),
read by the job object, claimed and updated by the worker's sender (``worker/webhooks.py``).
Functions take the caller's session and never commit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.ids import new_id
from app.jobs.tables import Job, JobStatus
from app.webhooks.tables import DeliveryState, WebhookMessage

EVENT_TYPES = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def job_summary(job: Job) -> dict[str, Any]:
    """What a webhook says about its job: enough to act on without a GET (the status, the model or
    the error), not the metrics or the hyperparameters."""
    return {
        "object": "job",
        "id": job.id,
        "status": str(job.status),
        "model_id": job.model_id,
        "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        "dataset_id": job.dataset_id,
        "base_model": job.base_model,
        "recipe": job.recipe,
        "metadata": job.metadata_,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def enqueue(session: Session, job: Job) -> WebhookMessage | None:
    """The message announcing ``job``'s final status, if it has a webhook URL. Call it in the
    transaction that sets that status (with ``job`` as it will be committed): the message then
    exists if and only if the status does."""
    event_type = EVENT_TYPES.get(JobStatus(job.status))
    if not job.webhook_url or event_type is None:
        return None
    now = utcnow()
    body = {"type": event_type, "timestamp": _iso(job.finished_at or now), "data": job_summary(job)}
    message = WebhookMessage(
        id=new_id("msg"),
        job_id=job.id,
        owner_id=job.owner_id,
        url=job.webhook_url,
        event_type=event_type,
        # The exact bytes signed and sent on every attempt.
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
        state=DeliveryState.PENDING,
        attempt_count=0,
        attempts=[],
        next_attempt_at=now,
        created_at=now,
    )
    session.add(message)
    return message


def of_job(session: Session, job_id: str) -> Sequence[WebhookMessage]:
    stmt = select(WebhookMessage).where(WebhookMessage.job_id == job_id)
    return session.scalars(stmt.order_by(WebhookMessage.created_at, WebhookMessage.id)).all()


def claim_due(session: Session, now: datetime, lease_s: float, limit: int) -> list[WebhookMessage]:
    """Up to ``limit`` pending messages whose next attempt is due, each leased to the caller until
    ``now + lease_s`` by a conditional UPDATE (a message another sender holds, or just took, is
    skipped); the caller commits. A sender that dies mid-attempt leaves its lease to run out, and
    the message is tried again."""
    free = or_(WebhookMessage.locked_until.is_(None), WebhookMessage.locked_until < now)
    due = session.scalars(
        select(WebhookMessage)
        .where(WebhookMessage.state == DeliveryState.PENDING, WebhookMessage.next_attempt_at <= now, free)
        .order_by(WebhookMessage.next_attempt_at)
        .limit(limit)
    ).all()
    claimed = []
    for message in due:
        won = session.execute(
            update(WebhookMessage)
            .where(
                WebhookMessage.id == message.id,
                WebhookMessage.state == DeliveryState.PENDING,
                WebhookMessage.attempt_count == message.attempt_count,
                free,
            )
            .values(locked_until=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(message)
    return claimed


def record_attempt(
    session: Session,
    message_id: str,
    claimed_count: int,
    attempt: dict[str, Any],
    *,
    delivered: bool,
    next_delay_s: float | None,
) -> bool:
    """Append one attempt to a message claimed at ``claimed_count`` attempts, and set what follows:
    delivered, pending again after ``next_delay_s``, or failed (``next_delay_s`` None). False when
    the message is no longer the caller's (its lease ran out and another sender took it)."""
    message = session.scalar(
        select(WebhookMessage)
        .where(WebhookMessage.id == message_id, WebhookMessage.attempt_count == claimed_count)
        .with_for_update()
    )
    if message is None or message.state != DeliveryState.PENDING:
        return False
    now = utcnow()
    message.attempts = [*message.attempts, attempt]
    message.attempt_count = claimed_count + 1
    message.locked_until = None
    if delivered:
        message.state = DeliveryState.DELIVERED
        message.finished_at = now
        message.next_attempt_at = None
    elif next_delay_s is None:
        message.state = DeliveryState.FAILED
        message.finished_at = now
        message.next_attempt_at = None
    else:
        message.next_attempt_at = now + timedelta(seconds=next_delay_s)
    return True
