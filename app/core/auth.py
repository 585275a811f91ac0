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
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.db import get_session, get_sessionmaker
from app.core.errors import Unauthorized, database_error, problem
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


# Where ``KeyFirst`` leaves the owner it found, in the request's ASGI scope.
OWNER_STATE = "lafter_owner"


def authenticate(header: str | None, settings: Settings, session: Session) -> Owner:
    """The owner an ``Authorization`` header proves, or ``Unauthorized``."""
    if settings.auth == "off":
        return Owner(id=settings.default_owner_id)
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


def current_owner(
    request: Request,
    _scheme: object = Depends(bearer_scheme),
    settings: Settings = Depends(get_settings),
    session: Session = Depends(get_session),
) -> Owner:
    checked = request.scope.get("state", {}).get(OWNER_STATE)
    if isinstance(checked, Owner):  # ``KeyFirst`` checked this request's key before its body
        return checked
    return authenticate(request.headers.get("authorization"), settings, session)


def authenticate_in_new_session(header: str | None, settings: Settings) -> Owner:
    with get_sessionmaker()() as session:
        return authenticate(header, settings, session)


async def request_owner(request: Request, _scheme: object = Depends(bearer_scheme)) -> Owner:
    """``current_owner`` for hot routes (classify): no thread hop and no database session when the
    owner is already known (``KeyFirst`` checked the key, or auth is off)."""
    checked = request.scope.get("state", {}).get(OWNER_STATE)
    if isinstance(checked, Owner):
        return checked
    settings = get_settings()
    if settings.auth == "off":
        return Owner(id=settings.default_owner_id)
    return await run_in_threadpool(
        authenticate_in_new_session, request.headers.get("authorization"), settings
    )


class KeyFirst:
    """Checks the API key of every ``/v1`` request before any of its body is read (pure ASGI, in
    front of the body limit and the routes): FastAPI reads and parses a body before it runs a route's
    dependencies, so without this a request with no key could make the API read, spool and parse
    hundreds of megabytes before its 401. A refused request's body is never read, and its connection
    is closed after the answer (``Connection: close``) rather than drained. The owner found is handed
    to ``current_owner`` in the request's scope, so the key is looked up once."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope["type"] != "http"
            or self.settings.auth == "off"
            or not (path == "/v1" or path.startswith("/v1/"))
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            owner = await run_in_threadpool(self._check, headers.get("authorization"))
        except Unauthorized as exc:
            response = problem(
                exc.status, exc.code, exc.message, title=exc.title, instance=path, headers=exc.headers
            )
        except Exception as exc:  # a database that cannot be reached: 503, like every other route
            response = database_error(str(scope.get("method", "")), path, exc)
        else:
            scope.setdefault("state", {})[OWNER_STATE] = owner
            await self.app(scope, receive, send)
            return
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            response.headers["connection"] = "close"  # its body was not read: this connection is done
        await response(scope, receive, send)

    def _check(self, header: str | None) -> Owner:
        return authenticate_in_new_session(header, self.settings)
