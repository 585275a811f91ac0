"""Typed errors: one class per kind of failure a caller can act on, each carrying the service's
problem ``code`` (``dataset_not_found``, ``job_finished``, ...), the HTTP ``status`` and the
``detail``."""

from __future__ import annotations

from typing import Any

import httpx


class LafterError(Exception):
    """Base of every error this client raises. ``status`` is None when no HTTP answer came."""

    status: int | None = None
    default_code = "error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        body: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        self.code = code or self.default_code
        self.field = field
        self.body = body or {}
        self.response = response

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.detail}{where}"


class BadRequestError(LafterError):
    status = 400
    default_code = "bad_request"


class AuthenticationError(LafterError):
    status = 401
    default_code = "auth_invalid"


class PermissionDeniedError(LafterError):
    status = 403
    default_code = "forbidden"


class NotFoundError(LafterError):
    status = 404
    default_code = "not_found"


class ConflictError(LafterError):
    status = 409
    default_code = "conflict"


class PayloadTooLargeError(LafterError):
    status = 413
    default_code = "too_large"


class ValidationError(LafterError):
    status = 422
    default_code = "validation_error"


class RateLimitError(LafterError):
    status = 429
    default_code = "rate_limited"


class ServerError(LafterError):
    status = 500
    default_code = "internal_error"


class ServiceUnavailableError(ServerError):
    status = 503
    default_code = "unavailable"


class ConnectionError(LafterError):  # the SDK's name for it, as openai's; shadows the builtin here
    """The service could not be reached (refused, reset, timed out), after the retries."""

    default_code = "connection_error"


class TimeoutError(LafterError):
    """``jobs.wait`` ran out of time before the job was final."""

    default_code = "wait_timeout"


class StreamError(LafterError):
    """An event stream ended without its final event, or sent an ``error`` event."""

    default_code = "stream_error"


_BY_STATUS: dict[int, type[LafterError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for(response: httpx.Response) -> LafterError:
    """The typed error of a non-2xx answer, from its problem JSON when it has one."""
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else LafterError)
    detail = body.get("detail")
    if not isinstance(detail, str):
        # FastAPI's own errors may carry a list here; the text of the answer is better than nothing.
        detail = str(detail) if detail is not None else (response.text[:500] or response.reason_phrase)
    code = body.get("code") if isinstance(body.get("code"), str) else None
    field = body.get("field") if isinstance(body.get("field"), str) else None
    return cls(detail, status=status, code=code, field=field, body=body, response=response)
