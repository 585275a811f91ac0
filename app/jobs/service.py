"""Job rules: validation before queueing, cancellation, presentation. Never commits: the router
does; broker work a rule needs (sending a new job, a cancel signal, the next job of a freed slot)
runs after that commit (``app.core.db.after_commit``), so a worker never gets an id whose row it
cannot see."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, object_session

from app.base_models.service import validate_spec
from app.core import broker
from app.core.auth import Owner
from app.core.db import after_commit, utcnow
from app.core.errors import Conflict, Invalid, NotFound
from app.core.ids import new_id
from app.core.settings import Settings, get_settings
from app.datasets import repository as datasets
from app.jobs import repository, transitions
from app.jobs.dispatch import dispatch_later
from app.jobs.schemas import JobCreate, JobError, JobEventOut, JobOut, Progress, to_configs
from app.jobs.tables import TERMINAL, Job, JobEvent, JobStatus
from app.webhooks import outbox
from app.webhooks import service as webhook_secrets
from app.webhooks import urls as webhook_urls
from app.webhooks.schemas import DeliveryAttempt, WebhookDelivery
from app.webhooks.tables import WebhookMessage
from lafter.descriptions import class_key, validate_class_names
from lafter.errors import LafterError


def _validate_descriptions(body: JobCreate, names: list[str], settings: Settings) -> dict[str, Any]:
    desc = body.descriptions
    if desc.source == "llm" and not (settings.llm_base_url or settings.llm_api_key):
        raise Invalid(
            "descriptions.source is 'llm' but this deployment has no language model "
            "(LAFTER_LLM_BASE_URL / LAFTER_LLM_API_KEY); use 'auto' or 'templates'",
            code="llm_not_configured",
            field="descriptions.source",
        )
    if desc.source == "provided":
        if not desc.provided:
            raise Invalid(
                "descriptions.source is 'provided' but descriptions.provided is empty",
                code="descriptions_invalid",
                field="descriptions.provided",
            )
        known = {class_key(n) for n in names}
        unknown = sorted(k for k in desc.provided if class_key(k) not in known)
        if unknown:
            raise Invalid(
                f"descriptions.provided names classes not in class_names: {unknown[:10]}",
                code="descriptions_invalid",
                field="descriptions.provided",
            )
        given: dict[str, str] = {}
        for name, sentences in desc.provided.items():
            key = class_key(name)
            if key in given:
                raise Invalid(
                    f"descriptions.provided names one class twice: {given[key]!r} and {name!r}",
                    code="descriptions_invalid",
                    field=f"descriptions.provided.{name}",
                )
            given[key] = name
            if not any(sentence.strip() for sentence in sentences):
                # Stage 0 would refuse it in the worker, after the job was queued: refuse it now.
                raise Invalid(
                    f"descriptions.provided has no sentence for class {name!r}: give at least one",
                    code="descriptions_invalid",
                    field=f"descriptions.provided.{name}",
                )
        missing = [n for n in names if class_key(n) not in given]
        if missing:
            raise Invalid(
                f"descriptions.provided has no sentences for: {missing[:10]}",
                code="descriptions_invalid",
                field="descriptions.provided",
            )
    elif desc.provided:
        raise Invalid(
            "descriptions.provided is only used with source 'provided'",
            code="descriptions_invalid",
            field="descriptions.provided",
        )
    return desc.model_dump(exclude_none=True)


def _validate_webhook(session: Session, owner: Owner, url: str, settings: Settings) -> None:
    """A webhook the service can send and sign, to an address it may reach (checked again at each
    delivery, on the address connected to)."""
    try:
        parts = webhook_urls.parse(url)
    except webhook_urls.WebhookUrlError as exc:
        raise Invalid(str(exc), code=exc.code, field="webhook_url") from None
    if webhook_secrets.get(session, owner.id) is None:
        # Made explicitly, never implicitly: a secret nobody has seen would sign messages that no
        # receiver can verify.
        raise Invalid(
            "webhook_url needs a webhook secret to sign the messages with, and you have none: "
            "POST /v1/webhook-secret once (it answers the secret, shown that one time), then submit "
            "the job again",
            code="webhook_secret_missing",
            field="webhook_url",
        )
    assert parts.hostname is not None
    try:
        webhook_urls.resolve(
            parts.hostname, webhook_urls.default_port(parts), allow_private=settings.webhook_allow_private
        )
    except webhook_urls.WebhookUrlError as exc:
        raise Invalid(str(exc), code=exc.code, field="webhook_url") from None


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create(
    session: Session, owner: Owner, body: JobCreate, settings: Settings, *, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate and insert a queued job. Returns (job, created); an Idempotency-Key this owner used
    within ``LAFTER_IDEMPOTENCY_TTL_S`` with the same body returns the first job (created False),
    with another body a 409. An older key is released from its job and names the new one."""
    digest = request_hash(body)
    if idempotency_key is not None:
        prior = repository.by_idempotency_key(session, owner.id, idempotency_key)
        if prior is not None:
            if prior.created_at > utcnow() - timedelta(seconds=settings.idempotency_ttl_s):
                if prior.request_hash != digest:
                    raise Conflict(
                        "this Idempotency-Key was used with a different request body",
                        code="idempotency_key_reused",
                    )
                return prior, False
            # Expired. The (owner, key) pair is unique, so the old job gives the key up (in this
            # transaction: a request that fails validation below keeps it where it was).
            prior.idempotency_key = None
            session.flush()

    if body.webhook_url is not None:
        _validate_webhook(session, owner, body.webhook_url, settings)
    # A ClassNamesError is answered 422 with its code and the field at fault (app.core.errors).
    names = validate_class_names(
        body.class_names, max_length=settings.max_class_name_length, max_classes=settings.max_classes
    )
    # Locked against deletion until the job row is committed: a delete waits and then sees the job
    # (409 dataset_in_use), or came first and the dataset is gone (dataset_not_found).
    ds = datasets.get(session, owner.id, body.dataset_id, lock="use")
    if ds is None:
        raise Invalid(f"dataset {body.dataset_id} not found", code="dataset_not_found", field="dataset_id")
    if ds.image_count < settings.min_images_per_job:
        raise Invalid(
            f"dataset {ds.id} has {ds.image_count} unlabelled images; a job needs at least "
            f"{settings.min_images_per_job} (LAFTER_MIN_IMAGES_PER_JOB)",
            code="dataset_too_small",
            field="dataset_id",
        )
    spec = validate_spec(body.base_model, settings)
    descriptions = _validate_descriptions(body, names, settings)
    try:
        to_configs(body.hyperparameters, body.recipe)  # what the worker will build: refused now, not then
    except LafterError as exc:
        raise Invalid(str(exc), code="hyperparameters_invalid", field="hyperparameters") from exc

    now = utcnow()
    job = Job(
        id=new_id("job"),
        owner_id=owner.id,
        dataset_id=ds.id,
        status=JobStatus.QUEUED,
        base_model=spec,
        class_names=names,
        descriptions=descriptions,
        recipe=body.recipe,
        hyperparameters=body.hyperparameters.model_dump(),
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        webhook_url=body.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=digest,
        warnings=[],
        metrics={},
        created_at=now,
        queued_at=now,
    )
    session.add(job)
    session.flush()
    repository.add_event(
        session, job.id, "log", message=f"queued: {len(names)} classes, {ds.image_count} images, base {spec}"
    )
    # Sent to the workers once committed, if its owner has a free slot; otherwise it waits queued
    # (with its queue_position) until one frees.
    dispatch_later(session, owner.id)
    return job, True


def get(session: Session, owner: Owner, job_id: str) -> Job:
    job = repository.get(session, owner.id, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return job


def cancel(session: Session, owner: Owner, job_id: str) -> Job:
    """A queued job is cancelled at once (the worker skips it); a running one is asked to stop and
    stops between steps."""
    job = repository.get(session, owner.id, job_id, for_update=True)
    if job is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    if job.status in TERMINAL:
        raise Conflict(f"job {job.id} already finished ({job.status})", code="job_finished")
    changed = transitions.cancel(session, job)
    if changed == JobStatus.CANCELLED:
        # It may have held a slot: the owner's next waiting job moves up.
        dispatch_later(session, job.owner_id)
    elif changed == JobStatus.CANCELLING:
        # The worker stops before its next step: at once on a Redis broker, else at its next status
        # read (LAFTER_CANCEL_POLL_INTERVAL_S).
        job_id = job.id
        after_commit(session, lambda: broker.signal_cancel(job_id))
    session.flush()
    return job


def queue_position(job: Job, settings: Settings | None = None) -> int | None:
    """For a queued job beyond its owner's cap: 1 = the next to be sent to the workers."""
    session = object_session(job)
    if job.status != JobStatus.QUEUED or session is None:
        return None
    return repository.queue_position(session, job, (settings or get_settings()).max_active_jobs_per_owner)


def event_out(event: JobEvent) -> JobEventOut:
    return JobEventOut(
        id=event.seq,
        created_at=event.created_at,
        kind=event.kind,  # type: ignore[arg-type]
        level=event.level,
        stage=event.stage,
        step=event.step,
        message=event.message,
        data=event.data,
    )


def delivery_out(message: WebhookMessage) -> WebhookDelivery:
    return WebhookDelivery(
        id=message.id,
        type=message.event_type,  # type: ignore[arg-type]
        state=message.state,  # type: ignore[arg-type]
        attempts=[DeliveryAttempt.model_validate(a) for a in message.attempts],
        next_attempt_at=message.next_attempt_at,
        created_at=message.created_at,
    )


def webhook_deliveries(job: Job) -> list[WebhookDelivery]:
    session = object_session(job)
    if not job.webhook_url or session is None:
        return []
    return [delivery_out(m) for m in outbox.of_job(session, job.id)]


def to_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        stage=job.stage,
        dataset_id=job.dataset_id,
        base_model=job.base_model,
        class_names=list(job.class_names),
        descriptions=job.descriptions,
        recipe=job.recipe,
        progress=Progress(
            percent=round(job.percent, 2),
            stage_percent=round(job.stage_percent, 2),
            step=job.step,
            total_steps=job.total_steps,
            eta_seconds=None if job.eta_seconds is None else round(job.eta_seconds, 1),
        ),
        hyperparameters=job.hyperparameters,
        seed=job.seed,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        model_id=job.model_id,
        metrics=job.metrics,
        warnings=list(job.warnings),
        metadata=job.metadata_,
        webhook_url=job.webhook_url,
        webhook_deliveries=webhook_deliveries(job),
        created_at=job.created_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=queue_position(job),
        attempts=job.attempts,
    )
