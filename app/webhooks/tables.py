from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow


class WebhookSecret(Base):
    """An owner's signing secret. Stored as it is, not hashed: the worker must compute HMACs with it
    (a hash could only check a secret presented to us, and nobody presents this one)."""

    __tablename__ = "webhook_secrets"

    owner_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(200))  # "whsec_<base64 of the key bytes>"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookMessage(Base):
    """The outbox: one event of one job for its ``webhook_url``, written in the transaction that gave
    the job its final status, so a message exists exactly when the status does. ``id`` is the
    ``webhook-id`` header (the same on every attempt) and ``body`` the exact bytes signed and sent.
    The worker claims a due message by moving ``locked_until`` forward with a conditional UPDATE;
    each attempt is appended to ``attempts``."""

    __tablename__ = "webhook_messages"
    __table_args__ = (Index("ix_webhook_messages_state_next_attempt_at", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2000))
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # [{at, status_code, error, duration_ms}], oldest first
    attempts: Mapped[list[Any]] = mapped_column(default=list)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
