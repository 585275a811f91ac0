"""Errors as values with a stable code, mapped once to RFC 7807 problem JSON.

Services raise ``ApiError`` subclasses (or return them in reports); ``install_error_handlers``
turns them, FastAPI's validation errors and ``lafter`` errors into ``application/problem+json``,
and a database that cannot be reached into 503 ``database_unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.ids import new_id
from lafter.errors import LafterError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
DB_RETRY_AFTER_S = 5


class ApiError(Exception):
    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.field = field
        self.extra = extra or {}
        self.headers = headers or {}

    @property
    def message(self) -> str:
        return str(self)


class Unauthorized(ApiError):
    """No usable API key. Always carries ``WWW-Authenticate: Bearer`` (RFC 6750)."""

    status = 401
    code = "auth_invalid"
    title = "Unauthorized"

    def __init__(self, message: str, *, code: str = "auth_invalid") -> None:
        challenge = 'Bearer realm="lafter"'
        if code == "auth_invalid":
            challenge += ', error="invalid_token"'
        super().__init__(message, code=code, headers={"WWW-Authenticate": challenge})


class NotFound(ApiError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(ApiError):
    status = 409
    code = "conflict"
    title = "Conflict"


class Invalid(ApiError):
    """The request is well-formed but names something unusable; ``field`` says which part."""

    status = 422
    code = "invalid_request"
    title = "Unprocessable request"


class TooLarge(ApiError):
    status = 413
    code = "too_large"
    title = "Payload too large"


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://lafter.dev/problems/{code}",
        "title": title or code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def is_database_unavailable(exc: BaseException) -> bool:
    """A failure to reach the database (refused, dropped, timed out, pool exhausted), as opposed to
    a statement the database rejected (a bug, or a constraint doing its job)."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection came free in time
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(
            exc, (sa_exc.OperationalError, sa_exc.InterfaceError)
        )
    return False


def internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """500 ``internal_error``. The details (which may hold SQL, parameters or server paths) go to
    the log only, found by the error id the client gets."""
    error_id = new_id("err")
    log.error("unhandled error on %s %s (error id %s)", method, path, error_id, exc_info=exc)
    return problem(
        500,
        "internal_error",
        f"internal error (error id {error_id}); the operator can look it up in the server log",
        instance=path,
        extra={"error_id": error_id},
    )


def database_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """503 ``database_unavailable`` for a database that cannot be reached, else 500."""
    if not is_database_unavailable(exc):
        return internal_error(method, path, exc)
    # Expected while the database is down or restarting; the pool reconnects by itself.
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    log.warning("database unavailable on %s %s: %s", method, path, reason[0] if reason else exc)
    return problem(
        503,
        "database_unavailable",
        f"the database cannot be reached right now; retry in {DB_RETRY_AFTER_S} s",
        title="Service unavailable",
        instance=path,
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem(
            exc.status,
            exc.code,
            exc.message,
            title=exc.title,
            field=exc.field,
            extra=exc.extra,
            instance=request.url.path,
            headers=exc.headers or None,
        )

    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path, exc)

    app.add_exception_handler(Exception, _unexpected)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        return database_error(request.method, request.url.path, exc)

    app.add_exception_handler(sa_exc.DBAPIError, _database)
    app.add_exception_handler(sa_exc.TimeoutError, _database)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field_of(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0]["field"] if errors else None
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return problem(
            422,
            "validation_error",
            detail,
            title="Invalid request",
            field=first,
            errors=errors,
            instance=request.url.path,
        )

    @app.exception_handler(LafterError)
    async def _lafter(request: Request, exc: LafterError) -> JSONResponse:
        # The library's refusals of what a request asked (class names, specs, settings): its code,
        # and the part of the request at fault when the error names one.
        field = getattr(exc, "field", None)
        return problem(422, exc.code, exc.message, field=field, instance=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        default = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        code = str(getattr(exc, "code", default))
        status = exc.status_code
        if status == 400 and str(exc.detail).startswith("Too many files"):
            # Starlette's multipart limit: a size problem, answered like the others.
            status, code = 413, "too_many_files"
        return problem(status, code, str(exc.detail), instance=request.url.path)
