from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class WebhookSecretCreated(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(
        description="whsec_<base64>: shown this once; keep it where your receiver can read it. "
        "Every webhook is signed with it from the next delivery attempt on."
    )
    created_at: datetime
    rotated: bool = Field(description="true when this replaced an earlier secret, which no longer signs")


class WebhookSecretStatus(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    exists: bool
    created_at: datetime | None = Field(default=None, description="when the current secret was made")


class DeliveryAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null when none came back")
    error: str | None = Field(
        description="why the attempt failed (timeout, refused, status ...); null on success"
    )
    duration_ms: float


class WebhookDelivery(BaseModel):
    id: str = Field(description="the webhook-id header: the same on every attempt of this message")
    type: Literal["job.succeeded", "job.failed", "job.cancelled"]
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending: not yet delivered, attempts left; delivered: a 2xx came back; failed: "
        "every attempt failed (LAFTER_WEBHOOK_RETRY_DELAYS_S)"
    )
    attempts: list[DeliveryAttempt]
    next_attempt_at: datetime | None = None
    created_at: datetime
