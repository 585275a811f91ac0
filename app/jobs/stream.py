"""A job's events as Server-Sent Events (``GET /v1/jobs/{id}/events`` with
``Accept: text/event-stream``).

Each event goes out as ``id: <seq>``, ``event: <kind>``, ``data: <the JSON event>``, so a client's
``Last-Event-ID`` resumes right after the last one it got. When the job is final the stream sends
``event: done`` with the job object and ends. A comment line goes out every
``LAFTER_EVENTS_HEARTBEAT_S`` whatever else is sent, so proxies keep a quiet stream open.

The stream reads the database every ``LAFTER_EVENTS_POLL_INTERVAL_S`` in a worker thread, each read
in a session of its own: an open stream holds no connection between reads, however long the job
runs. A read that fails because the database cannot be reached is retried with backoff while the
heartbeats go on; the response has long been sent, so a 503 is no longer possible, and a client
that waits is better served than one whose stream was cut."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.core.errors import Invalid, is_database_unavailable
from app.core.ids import new_id
from app.core.settings import Settings
from app.jobs import repository, service
from app.jobs.schemas import JobEventOut, JobOut
from app.jobs.tables import TERMINAL, Job

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
# Events read per database round trip; a stream that resumes far behind catches up in these steps.
BATCH = 500
# The longest wait between two reads while the database is unreachable.
MAX_BACKOFF_S = 5.0
# What EventSource waits before it reconnects a dropped stream (the SSE ``retry:`` field).
RETRY_MS = 2000

HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to; a buffered stream arrives in lumps.
    "X-Accel-Buffering": "no",
}


def wants_stream(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for Server-Sent Events (a plain ``*/*`` gets JSON)."""
    if not accept:
        return False
    return any(part.split(";")[0].strip().lower() == MEDIA_TYPE for part in accept.split(","))


@dataclass
class Batch:
    events: list[JobEventOut]
    more: bool  # a full batch: more events are waiting already
    final: JobOut | None  # the job, once it is final and every event before that was read
    missing: bool = False  # the job is gone (deleted with its dataset)


def read_since(sessions: sessionmaker[Session], job_id: str, after: int | None) -> Batch:
    with sessions() as session:
        # The row first, then the events: the final status is committed with its own event, so
        # every event up to it is in the query below, which sees at least what this read saw.
        job = session.get(Job, job_id)
        if job is None:
            return Batch([], False, None, missing=True)
        rows = list(repository.events(session, job_id, after, BATCH + 1))
        more = len(rows) > BATCH
        events = [service.event_out(r) for r in rows[:BATCH]]
        final = service.to_out(job) if job.status in TERMINAL and not more else None
        return Batch(events, more, final)


def frame(event: str, data: str, event_id: int | None = None) -> str:
    """One SSE message; ``data`` is one line of JSON (json never writes a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


def _problem(code: str, message: str) -> str:
    return json.dumps({"code": code, "detail": message})


async def event_stream(
    job_id: str, after: int | None, settings: Settings, sessions: sessionmaker[Session]
) -> AsyncIterator[str]:
    poll_s = settings.events_poll_interval_s
    beat_s = settings.events_heartbeat_s
    yield f"retry: {RETRY_MS}\n\n"
    next_beat = time.monotonic() + beat_s
    failures = 0
    while True:
        try:
            batch = await run_in_threadpool(read_since, sessions, job_id, after)
        except Exception as exc:
            if not is_database_unavailable(exc):
                error_id = new_id("err")
                log.error("event stream of job %s failed (error id %s)", job_id, error_id, exc_info=exc)
                message = f"internal error (error id {error_id}); reconnect to resume"
                yield frame("error", _problem("internal_error", message))
                return
            failures += 1
            if failures == 1:
                log.warning("event stream of job %s: database unavailable, retrying (%s)", job_id, exc)
                yield ": database unavailable, retrying\n\n"
            wait = min(poll_s * 2**failures, max(poll_s, MAX_BACKOFF_S))
        else:
            failures = 0
            for event in batch.events:
                yield frame(event.kind, event.model_dump_json(), event.id)
                after = event.id
            if batch.missing:
                yield frame("error", _problem("job_not_found", f"job {job_id} no longer exists"))
                return
            if batch.final is not None:
                yield frame("done", batch.final.model_dump_json())
                return
            wait = 0.0 if batch.more else poll_s
        deadline = time.monotonic() + wait
        while True:
            now = time.monotonic()
            if now >= next_beat:
                yield ": heartbeat\n\n"
                next_beat = now + beat_s
            if now >= deadline:
                break
            await asyncio.sleep(min(deadline, next_beat) - now)


def parse_cursor(value: str | None, field: str) -> int | None:
    """An event cursor (``?after=`` or ``Last-Event-ID``): an event number, or None."""
    if not value:
        return None
    try:
        cursor = int(value)
    except ValueError:
        cursor = -1
    if not 0 <= cursor < 2**31:  # a job's event numbers are INTEGERs
        raise Invalid(f"{field} must be an event cursor", code="cursor_invalid", field=field)
    return cursor
