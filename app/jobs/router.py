from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.auth import Owner, current_owner
from app.core.db import get_session, get_sessionmaker
from app.core.metrics import JOBS_CREATED
from app.core.pagination import Page, PageParams, page_params, paginate
from app.core.settings import Settings, get_settings
from app.jobs import repository, service, stream
from app.jobs.schemas import JobCreate, JobEventOut, JobOut, JobStatus
from app.jobs.tables import Job

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def create_job(
    body: JobCreate,
    response: Response,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> JobOut:
    try:
        job, created = service.create(session, owner, body, settings, idempotency_key=idempotency_key)
        session.commit()
    except IntegrityError:
        # Two requests with one Idempotency-Key raced (a client retrying after a timeout): the
        # unique (owner, key) index let one insert win; the loser answers with the winner's job.
        session.rollback()
        job, created = service.create(session, owner, body, settings, idempotency_key=idempotency_key)
        session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
        return service.to_out(job)
    JOBS_CREATED.inc()
    return service.to_out(job)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    status_: JobStatus | None = Query(None, alias="status"),
    params: PageParams = Depends(page_params),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
) -> Page[JobOut]:
    rows, has_more, cursor = paginate(session, repository.list_query(owner.id, status_), Job.id, params)
    return Page[JobOut](data=[service.to_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(
    job_id: str, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> JobOut:
    return service.to_out(service.get(session, owner, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(
    job_id: str, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> JobOut:
    job = service.cancel(session, owner, job_id)
    session.commit()
    return service.to_out(job)


@router.get(
    "/{job_id}/events",
    response_model=Page[JobEventOut],
    responses={
        200: {
            "content": {stream.MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "JSON pages; with `Accept: text/event-stream`, the same events as "
            "Server-Sent Events (`id:` the event's number, `event:` its kind, `data:` the event), a "
            "comment line as heartbeat, and `event: done` with the job object once it is final, "
            "after which the stream ends. `Last-Event-ID` resumes after that event, like `?after=`.",
        }
    },
)
def job_events(
    job_id: str,
    request: Request,
    after: str | None = Query(
        None,
        description="cursor: the next_cursor of the previous page, or the id of the last event seen "
        "(a job's events are numbered 1, 2, 3... in the order they were written)",
    ),
    limit: int = Query(100, ge=1, le=1000),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> Page[JobEventOut] | StreamingResponse:
    job = service.get(session, owner, job_id)
    after_id = stream.parse_cursor(after, "after")
    # An EventSource reconnecting sends the last id it got, on the URL it first opened: that id wins.
    resume = stream.parse_cursor(request.headers.get("last-event-id"), "Last-Event-ID")
    if resume is not None:
        after_id = resume
    if stream.wants_stream(request.headers.get("accept")):
        # The stream reads in sessions of its own: this one gives its connection back now, not
        # when the stream ends.
        session.close()
        return StreamingResponse(
            stream.event_stream(job.id, after_id, settings, get_sessionmaker()),
            media_type=stream.MEDIA_TYPE,
            headers=stream.HEADERS,
        )
    rows = list(repository.events(session, job.id, after_id, limit + 1))
    has_more = len(rows) > limit
    rows = rows[:limit]
    # Always hand back a cursor, so a poller can continue from the last event it saw.
    cursor = str(rows[-1].seq) if rows else (str(after_id) if after_id is not None else None)
    return Page[JobEventOut](
        data=[service.event_out(r) for r in rows],
        has_more=has_more,
        next_cursor=cursor,
    )
