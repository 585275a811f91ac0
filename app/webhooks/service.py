"""Each owner's webhook signing secret. Never commits (the request owns the transaction)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.webhooks.signing import new_secret
from app.webhooks.tables import WebhookSecret


def get(session: Session, owner_id: str) -> WebhookSecret | None:
    return session.get(WebhookSecret, owner_id)


def rotate(session: Session, owner_id: str) -> tuple[WebhookSecret, bool]:
    """A new secret for the owner, replacing any earlier one (from the next delivery attempt on).
    Returns (row, rotated): rotated is True when a secret existed before. Concurrent rotations of
    one owner are serialised by the row lock; the last one's secret is the one kept."""
    row = session.get(WebhookSecret, owner_id, with_for_update=True)
    rotated = row is not None
    if row is None:
        row = WebhookSecret(owner_id=owner_id, secret=new_secret(), created_at=utcnow())
        session.add(row)
    else:
        row.secret = new_secret()
        row.created_at = utcnow()
    session.flush()
    return row, rotated
