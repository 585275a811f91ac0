from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Header, Query, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.auth import Owner, current_owner
from app.core.db import get_session
from app.core.errors import Invalid
from app.core.metrics import JOBS_CREATED
from app.core.pagination import Page, PageParams, page_params, paginate
from app.core.settings import Settings, get_settings
from app.jobs import repository, service
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


@router.get("/{job_id}/events", response_model=Page[JobEventOut])
def job_events(
    job_id: str,
    after: str | None = Query(
        None,
        description="cursor: the next_cursor of the previous page, or the id of the last event seen "
        "(a job's events are numbered 1, 2, 3... in the order they were written)",
    ),
    limit: int = Query(100, ge=1, le=1000),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
) -> Page[JobEventOut]:
    job = service.get(session, owner, job_id)
    try:
        after_id = int(after) if after else None
    except ValueError:
        after_id = -1
    if after_id is not None and not 0 <= after_id < 2**31:  # a job's event numbers are INTEGERs
        raise Invalid("after must be an event cursor", code="cursor_invalid", field="after")
    rows = list(repository.events(session, job.id, after_id, limit + 1))
    has_more = len(rows) > limit
    rows = rows[:limit]
    # Always hand back a cursor, so a poller can continue from the last event it saw.
    cursor = str(rows[-1].seq) if rows else after
    return Page[JobEventOut](
        data=[service.event_out(r) for r in rows],
        has_more=has_more,
        next_cursor=cursor,
    )
