"""HTTP with the service's conventions: the API key, problem JSON turned into typed errors, and
retries with exponential backoff and jitter on 429, 502-504 and connection failures (honouring
``Retry-After``). A request that is not safe to repeat is retried only when it never reached the
server; a job submission is safe, because it carries one ``Idempotency-Key`` over all its tries."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from lafter_client.errors import ConnectionError, error_for

RETRY_STATUSES = frozenset({429, 502, 503, 504})
USER_AGENT = "lafter-client/0.1.0"


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Transport:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self.http.headers.update(headers)
        self._own_http = http_client is None

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def backoff(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds before try ``attempt + 1``: the server's ``Retry-After`` when it gave one, else
        ``backoff_s * 2**attempt`` with jitter (half of it random, so clients that failed together
        do not come back together), capped by ``max_backoff_s``."""
        told = retry_after_s(response) if response is not None else None
        if told is not None:
            return min(told, self.max_backoff_s)
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
        safe_to_repeat: bool | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One call, retried as the policy allows; returns a 2xx answer or raises a ``LafterError``.
        ``files`` is a factory, so a retried upload sends its files again from their start."""
        if safe_to_repeat is None:
            safe_to_repeat = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
        attempt = 0
        while True:
            kwargs: dict[str, Any] = {"params": params, "headers": headers}
            if json is not None:
                kwargs["json"] = json
            if data is not None:
                kwargs["data"] = data
            if files is not None:
                kwargs["files"] = files()
            if timeout is not None:
                kwargs["timeout"] = timeout
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # A refused connection never reached the server; anything later might have.
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
                if attempt < self.max_retries and (safe_to_repeat or never_sent):
                    self.sleep(self.backoff(attempt))
                    attempt += 1
                    continue
                raise ConnectionError(
                    f"could not reach {self.base_url}: {type(exc).__name__}: {exc}"
                ) from exc
            # 429 and 503 say the request was not processed: repeating it is safe.
            repeatable = safe_to_repeat or response.status_code in (429, 503)
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries and repeatable:
                delay = self.backoff(attempt, response)
                response.close()
                self.sleep(delay)
                attempt += 1
                continue
            if response.is_success:
                return response
            raise error_for(response)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        """A streamed GET: connected with the same retries as ``request``; the body is the caller's."""
        attempt = 0
        while True:
            request = self.http.build_request(
                method, path, params=params, headers=headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
            try:
                response = self.http.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt < self.max_retries:
                    self.sleep(self.backoff(attempt))
                    attempt += 1
                    continue
                raise ConnectionError(f"could not reach {self.base_url}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                delay = self.backoff(attempt, response)
                response.close()
                self.sleep(delay)
                attempt += 1
                continue
            if not response.is_success:
                response.read()
                response.close()
                raise error_for(response)
            try:
                yield response
            finally:
                response.close()
            return
