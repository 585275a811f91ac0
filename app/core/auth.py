"""Who is calling. Every dataset, job and model row carries ``owner_id``; routers get it from
``current_owner`` only, and every query is scoped by it, so one owner's rows are invisible (404)
to every other owner.

``LAFTER_AUTH=on`` (the default, and required in production): ``Authorization: Bearer <api key>``,
keys made with ``python -m app keys create --owner NAME`` and stored hashed (``app.keys``).
``LAFTER_AUTH=off`` (the default of ``python -m app``, the single-user mode): every request acts as
``LAFTER_DEFAULT_OWNER_ID``, and the API says so loudly at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session

from app.core.db import get_session
from app.core.errors import Unauthorized
from app.core.settings import Settings, get_settings
from app.keys import service as keys

# Declares the scheme in the OpenAPI document ("Authorize" in /docs); the header is parsed below,
# so that a missing key and a malformed one get different codes.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="api_key",
    description="An API key: `python -m app keys create --owner NAME` prints one.",
)


@dataclass(frozen=True)
class Owner:
    id: str


def current_owner(
    request: Request,
    _scheme: object = Depends(bearer_scheme),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> Owner:
    if settings.auth == "off":
        return Owner(id=settings.default_owner_id)
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise Unauthorized(
            "this API needs a key: send 'Authorization: Bearer <api key>' "
            "(an operator makes one with 'python -m app keys create --owner NAME')",
            code="auth_missing",
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must read 'Bearer <api key>'")
    key = keys.authenticate(session, token)
    if key is None:
        raise Unauthorized("this API key is not valid")
    if key.revoked_at is not None:
        raise Unauthorized(f"API key {key.id} was revoked")
    return Owner(id=key.owner_id)
