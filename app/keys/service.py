"""Making, checking and revoking API keys. Never commits (the caller owns the transaction).

A key reads ``lft_<key id>_<secret>``: the id is public (it names the key in ``keys list`` and
``keys revoke``) and finds the row; the secret is 32 random bytes, compared by its SHA-256 in
constant time. Only the id and the hash are stored, so a copy of the database grants nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.keys.tables import ApiKey

PREFIX = "lft"
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_KEY_PATTERN = re.compile(rf"^{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
# Compared against when the key id is unknown, so a miss costs the same as a wrong secret.
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    key: str  # the only time the full key exists outside the caller's hands


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(session: Session, owner_id: str, name: str | None = None) -> NewKey:
    if not OWNER_PATTERN.match(owner_id):
        raise ValueError(
            f"owner {owner_id!r} is not a valid owner id: 1-64 characters of letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, owner_id=owner_id, name=name, secret_sha256=_digest(secret), created_at=utcnow())
    session.add(row)
    session.flush()
    return NewKey(row, f"{PREFIX}_{key_id}_{secret}")


def authenticate(session: Session, presented: str) -> ApiKey | None:
    """The key whose secret the caller presented, or None (malformed, unknown id or wrong secret).
    A revoked key is returned too: the caller refuses it, and can say why."""
    match = _KEY_PATTERN.match(presented)
    if match is None:
        return None
    key_id, secret = match.groups()
    row = session.get(ApiKey, key_id)
    expected = row.secret_sha256 if row is not None else _DUMMY_DIGEST
    if not hmac.compare_digest(_digest(secret), expected) or row is None:
        return None
    return row


def revoke(session: Session, key_id: str) -> ApiKey | None:
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def list_keys(
    session: Session, owner_id: str | None = None, include_revoked: bool = False
) -> Sequence[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.owner_id, ApiKey.created_at)
    if owner_id is not None:
        stmt = stmt.where(ApiKey.owner_id == owner_id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return session.scalars(stmt).all()


def any_active(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
