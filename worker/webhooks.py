"""The webhook sender: a thread in every worker process that sends the outbox's due messages.

Why a thread and not a Celery task: the worker takes one job at a time from the ``gpu`` queue
(prefetch 1, concurrency 1), so a delivery task would wait behind a training run of up to
``LAFTER_JOB_TIME_LIMIT_S``; a second queue would need a second worker process that every deployment
(and ``python -m app``) must remember to start. The thread starts with the worker
(``worker_ready``), sends while jobs train (it only waits on sockets), and needs no broker: the
outbox table is the queue, so a message survives broker restarts, and a worker that dies mid-send
leaves a lease that runs out, after which any worker tries again (at-least-once delivery; receivers
dedupe on ``webhook-id``).

Each attempt resolves the URL's host again, refuses a forbidden address (unless
``LAFTER_WEBHOOK_ALLOW_PRIVATE``), and connects to the very address it checked (the check is inside
the connection's own name lookup), so a DNS answer that changed since submit reaches nothing private.
Redirects are not followed, no proxy is used, and each phase (connect, send, read) has
``LAFTER_WEBHOOK_TIMEOUT_S``. A 2xx is delivered; anything else is retried after the next of
``LAFTER_WEBHOOK_RETRY_DELAYS_S``, and the message fails once they are used up."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import utcnow
from app.core.settings import Settings
from app.webhooks import outbox, signing, urls
from app.webhooks import service as secrets
from app.webhooks.tables import WebhookMessage

log = logging.getLogger(__name__)

USER_AGENT = "lafter-webhooks/1"
MAX_ERROR_CHARS = 300


class ForbiddenAddress(Exception):
    """The host resolved to an address webhooks may not reach (or did not resolve)."""


class _CheckedBackend(httpcore.SyncBackend):
    """httpcore's socket backend with the URL rules inside its connect: the host is resolved here,
    every address checked, and the socket opened to one of those addresses, never to a second
    lookup's answer. TLS still verifies (and sends SNI for) the URL's host name."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = urls.resolve(host, port, allow_private=self.allow_private)
        except urls.WebhookUrlError as exc:
            raise ForbiddenAddress(str(exc)) from None
        error: Exception | None = None
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error


def _describe(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, ForbiddenAddress):
        return f"refused: {exc}"
    if isinstance(exc, httpcore.ConnectTimeout):
        return f"timeout: no connection within {timeout_s:g} s"
    if isinstance(exc, httpcore.TimeoutException):
        return f"timeout: no answer within {timeout_s:g} s"
    if isinstance(exc, httpcore.ConnectError):
        return f"could not connect: {exc}"
    if isinstance(exc, httpcore.RemoteProtocolError):
        return f"connection closed without a valid answer: {exc}"
    if isinstance(exc, httpcore.NetworkError):
        return f"connection error: {exc}"
    return f"error: {type(exc).__name__}"


def send(message: WebhookMessage, secret: str, settings: Settings) -> dict[str, Any]:
    """One attempt: POST the message, signed now. Returns the attempt's record (never raises for
    the receiver's or the network's failures)."""
    started_at = utcnow()
    start = time.monotonic()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signing.headers(secret, message.id, timestamp, message.body),
    }
    t = settings.webhook_timeout_s
    status: int | None = None
    error: str | None = None
    try:
        with httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_keepalive_connections=0,
            network_backend=_CheckedBackend(settings.webhook_allow_private),
        ) as pool:
            response = pool.request(
                "POST",
                message.url,
                headers=list(headers.items()),
                content=message.body.encode(),
                extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}},
            )
            status = response.status
    except Exception as exc:
        error = _describe(exc, t)
    if status is not None and not 200 <= status < 300:
        error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    return {
        "at": started_at.isoformat(),
        "status_code": status,
        "error": None if error is None else error[:MAX_ERROR_CHARS],
        "duration_ms": round((time.monotonic() - start) * 1000, 1),
    }


def next_delay(settings: Settings, attempts_made: int) -> float | None:
    """The wait before the next attempt after ``attempts_made`` failed ones; None when none is left."""
    delays = settings.webhook_retry_delays_s
    return delays[attempts_made - 1] if attempts_made <= len(delays) else None


def deliver_one(sessions: sessionmaker[Session], settings: Settings, message: WebhookMessage) -> bool:
    """Attempt a message claimed by this sender and record the outcome. True when delivered."""
    with sessions() as session:
        row = secrets.get(session, message.owner_id)
        secret = row.secret if row is not None else None
    if secret is None:  # secrets are replaced, never deleted; a row removed by hand lands here
        attempt: dict[str, Any] = {
            "at": utcnow().isoformat(),
            "status_code": None,
            "error": "not sent: the owner has no webhook secret (POST /v1/webhook-secret)",
            "duration_ms": 0.0,
        }
    else:
        attempt = send(message, secret, settings)
    delivered = attempt["error"] is None
    made = message.attempt_count + 1
    delay = None if delivered else next_delay(settings, made)
    with sessions() as session:
        kept = outbox.record_attempt(
            session, message.id, message.attempt_count, attempt, delivered=delivered, next_delay_s=delay
        )
        session.commit()
    outcome = "delivered" if delivered else ("retrying" if delay is not None else "failed")
    log.info(
        "webhook %s (%s, job %s) attempt %d: %s%s",
        message.id,
        message.event_type,
        message.job_id,
        made,
        attempt["error"] or f"HTTP {attempt['status_code']}",
        f"; {outcome}" if kept else "; not recorded (another sender took the message)",
    )
    return delivered


class WebhookSender:
    """``run_once`` every ``LAFTER_WEBHOOK_POLL_INTERVAL_S`` (at once again while there is more to
    send), in a daemon thread, until ``stop``."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lafter-webhooks", daemon=True)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="lafter-webhook")

    @property
    def lease_s(self) -> float:
        # Longer than one attempt can take (name lookup, connect, send, read), so a live sender
        # never loses a message it is still sending.
        return 3 * self.settings.webhook_timeout_s + 30.0

    def run_once(self) -> int:
        """Claim the due messages (at most one per slot) and send them; returns how many."""
        with self.sessions() as session:
            claimed = outbox.claim_due(session, utcnow(), self.lease_s, self.settings.webhook_concurrency)
            session.commit()
        futures = [self._pool.submit(deliver_one, self.sessions, self.settings, m) for m in claimed]
        for future in futures:
            try:
                future.result()
            except Exception:  # the database went away: the lease runs out and it is tried again
                log.warning("a webhook attempt could not be recorded", exc_info=True)
        return len(claimed)

    def start(self) -> WebhookSender:
        self._thread.start()
        log.info(
            "webhook sender: every %.1fs, %d at a time, timeout %.0fs, retries after %s s%s",
            self.settings.webhook_poll_interval_s,
            self.settings.webhook_concurrency,
            self.settings.webhook_timeout_s,
            ", ".join(f"{d:g}" for d in self.settings.webhook_retry_delays_s) or "(none)",
            "; private addresses allowed" if self.settings.webhook_allow_private else "",
        )
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = 0
            try:
                sent = self.run_once()
            except Exception:  # the database is down: try again next time
                log.warning("webhook pass failed", exc_info=True)
            if sent < self.settings.webhook_concurrency:
                self._stop.wait(self.settings.webhook_poll_interval_s)
