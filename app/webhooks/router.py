"""``/v1/webhook-secret``: the caller's signing secret, made or replaced by POST and shown then only;
GET says whether one exists."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.auth import Owner, current_owner
from app.core.db import get_session
from app.webhooks import service
from app.webhooks.schemas import WebhookSecretCreated, WebhookSecretStatus

router = APIRouter(prefix="/v1/webhook-secret", tags=["webhooks"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookSecretCreated)
def create_secret(
    response: Response, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> WebhookSecretCreated:
    """Make the secret that signs your webhooks, or replace it (the old one stops signing at once).
    The answer is the only time the secret is shown."""
    try:
        row, rotated = service.rotate(session, owner.id)
        session.commit()
    except IntegrityError:
        # Two first requests of one owner raced to insert: the second replaces the first's secret.
        session.rollback()
        row, rotated = service.rotate(session, owner.id)
        session.commit()
    response.headers["Cache-Control"] = "no-store"  # a secret: no cache keeps a copy
    return WebhookSecretCreated(secret=row.secret, created_at=row.created_at, rotated=rotated)


@router.get("", response_model=WebhookSecretStatus)
def secret_status(
    owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> WebhookSecretStatus:
    """Whether you have a webhook secret, and since when; never the secret itself."""
    row = service.get(session, owner.id)
    return WebhookSecretStatus(exists=row is not None, created_at=row.created_at if row else None)
