"""The job pipeline: describing -> encoding_text -> training_text_classifier -> adapting ->
evaluating -> registering. Takes a job id, loads what it needs, calls ``lafter``, and writes
progress, events, the outcome and the model row.

Safe to run for any message, any number of times: it claims the job with one conditional UPDATE
(queued -> running, within its owner's cap) and does nothing when it cannot (finished, running
elsewhere, cancelled, or waiting for a slot). A job re-run after its worker died (the reaper queued
it again) resumes: descriptions and text embeddings come from the database caches, and stage 2 (with
the stage-1 head it started from) from the checkpoint written every ``LAFTER_CHECKPOINT_EVERY_S``.
Every write is fenced by the attempt number, so a worker that lost its job cannot touch it."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.base_models.service import allowed
from app.caches.store import DbDescriptionCache, DbEmbeddingCache
from app.core.backbones import load_base
from app.core.db import utcnow
from app.core.errors import ApiError
from app.core.ids import new_id
from app.core.reaper import dispatch
from app.core.settings import Settings
from app.core.storage import BlobStorage
from app.datasets import repository as datasets
from app.jobs import repository as jobs
from app.jobs.schemas import HyperparametersIn, to_configs
from app.jobs.tables import TERMINAL, Job
from app.models.runtime import LRU
from app.models.tables import Model, ModelArtifact
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.descriptions import DescriptionConfig, class_key, generate_descriptions
from lafter.errors import Cancelled, InvalidInputError, LafterError
from lafter.finetune import AdaptCheckpoint, AdaptResult, adapt
from lafter.guard import evaluate_candidates
from lafter.llm import LLMClient, LLMConfig
from lafter.progress import ProgressEvent
from lafter.text_cache import embed_sentences
from lafter.text_classifier import TextClassifierResult, train_text_classifier
from lafter.views import ImageCache
from worker.reporter import LIVE, JobReporter, JobWatch

log = logging.getLogger(__name__)

# What ``_echo`` takes from stage 2's resolved settings, beside the request's own keys.
ECHOED_ADAPT = (
    "recipe",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "prompt_tokens",
    "label_smoothing",
    "max_steps",
    "pseudo_label_balance",
    "balance_tau",
    "balance_momentum",
    "balance_prior_init",
    "total_steps",
    "steps_per_epoch",
    "trainable_parameters",
    "precision",
    "device",
)

# Set when this worker process is asked to stop (SIGTERM or SIGINT: Celery's ``worker_shutting_down``,
# connected in worker/celery_app.py). A running job stops before its next step, stage 2 writing a
# checkpoint of its last step first, and is queued again to resume (``_requeue_for_shutdown``).
SHUTDOWN = threading.Event()


def request_shutdown(*_args: object, **_kwargs: object) -> None:
    """The ``worker_shutting_down`` receiver (it runs in a signal handler: only sets a flag)."""
    SHUTDOWN.set()


# Loaded base models of this worker process: a cache that says so (safe to lose, bounded).
_BASES: LRU[str, Backbone] | None = None


def _backbone(spec: str, settings: Settings) -> Backbone:
    """The job's base model, if this deployment allows it (the API checked at submit; a job queued
    before the deployment's allow-list changed is checked again here, before any file is read)."""
    global _BASES
    try:
        allowed(spec, settings)
    except ApiError as exc:
        raise StageError(exc.code, exc.message) from None
    if _BASES is None:
        _BASES = LRU(settings.base_model_cache_size)
    return _BASES.get_or_load(spec, lambda: load_base(spec, settings, device=settings.device))


@dataclass
class StageError(Exception):
    """A failure a user can act on, raised by the pipeline itself (not by ``lafter``)."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Outcome:
    served: AdaptedModel
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def _claim(sessions: sessionmaker[Session], settings: Settings, job_id: str) -> Job | None:
    """Move the job from queued to running and return it (its ``attempts`` is this run's fence), or
    None when this message must not run it."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.status != "queued":
            # Finished, cancelled, or running under another worker (a redelivered or duplicate
            # message): the row says what to do, and that is nothing.
            log.info("job %s is %s; nothing to do for this message", job_id, job.status)
            return None
        now = utcnow()
        stmt = update(Job).where(Job.id == job_id, Job.status == "queued")
        cap = settings.max_active_jobs_per_owner
        if cap:
            stmt = stmt.where(jobs.holds_slot(job.owner_id, job.created_at, job.id, cap))
        claimed = session.execute(
            stmt.values(
                status="running",
                started_at=job.started_at or now,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                worker_id=f"{socket.gethostname()}:{os.getpid()}",
                stage="describing",
                percent=0.0,
                stage_percent=0.0,
                step=0,
                total_steps=0,
            ).execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            log.info(
                "job %s was not claimed (taken by another message, or its owner has no free slot: "
                "LAFTER_MAX_ACTIVE_JOBS_PER_OWNER=%d); it is sent again when it can run",
                job_id,
                cap,
            )
            return None
        session.commit()
        session.refresh(job)
        session.expunge(job)
        return job


def _finish(
    session: Session,
    job: Job,
    status: str,
    *,
    code: str | None = None,
    message: str | None = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> None:
    job.status = status
    job.finished_at = utcnow()
    job.eta_seconds = None
    job.heartbeat_at = job.finished_at
    if code is not None:
        job.error_code = code
        job.error_message = message
    jobs.add_event(session, job.id, "log", stage=job.stage, level=level, message=message or status, data=data)


def _set_final(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    status: str,
    *,
    completed_steps: int | None = None,
    data: dict[str, Any] | None = None,
    **kwargs: Any,
) -> bool:
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        # Only this attempt's live job: not a finished one, nor one the reaper queued again.
        if job is None or job.status not in LIVE or job.attempts != attempt:
            return False
        if completed_steps is not None:
            job.step = completed_steps
            job.metrics = {**(job.metrics or {}), "completed_steps": completed_steps}
        _finish(session, job, status, data=data, **kwargs)
        session.commit()
    return True


def run_job(job_id: str, settings: Settings, sessions: sessionmaker[Session], storage: BlobStorage) -> str:
    """Run one job to a final status and return it. Never raises for a job's own failure."""
    if SHUTDOWN.is_set():
        # A message taken while this worker stops: left queued, the reaper sends it again.
        log.info("job %s: this worker is shutting down; leaving the job queued", job_id)
        return "skipped"
    job = _claim(sessions, settings, job_id)
    if job is None:
        return "skipped"
    attempt = job.attempts
    reporter = JobReporter(
        job_id, sessions, attempt=attempt, write_interval_s=settings.progress_write_interval_s
    )
    watch = JobWatch(job_id, attempt, sessions, settings)
    outcome = "skipped"
    final: dict[str, Any] | None = None  # how the job ended, when it did not succeed
    try:
        with watch:
            outcome = _register(
                job, _execute(job, settings, sessions, storage, reporter, watch), sessions, reporter
            )
    except Cancelled as exc:
        stage = exc.stage or reporter.stage
        if SHUTDOWN.is_set() and not watch.cancel_requested.is_set() and not watch.lost.is_set():
            # Stopped for this worker's shutdown, not by its owner: the job runs again elsewhere or
            # after the restart, stage 2 from the checkpoint written before it stopped.
            outcome = _requeue_for_shutdown(sessions, job_id, attempt, stage, exc.step)
            final = None
        else:
            final = {"status": "cancelled", "completed_steps": exc.step}
            final["message"] = f"cancelled during {stage} after {exc.step} steps"
    except StageError as exc:
        final = {"status": "failed", "code": exc.code, "message": exc.message, "level": "error"}
    except LafterError as exc:
        final = {
            "status": "failed",
            "code": exc.code,
            "message": f"{reporter.stage}: {exc}",
            "level": "error",
        }
    except SoftTimeLimitExceeded:
        final = {
            "status": "failed",
            "code": "time_limit_exceeded",
            "message": f"the job ran past LAFTER_JOB_TIME_LIMIT_S={settings.job_time_limit_s}s "
            f"in {reporter.stage}; lower epochs or max_steps",
            "level": "error",
        }
    except Exception:
        # What went wrong stays in the worker's log, found by the error id: an exception's text can
        # hold SQL, parameters, server paths or another owner's data, so the job shows none of it.
        error_id = new_id("err")
        log.exception("job %s failed unexpectedly in %s (error id %s)", job_id, reporter.stage, error_id)
        final = {
            "status": "failed",
            "code": "internal_error",
            "message": f"unexpected internal error in stage {reporter.stage} (error id {error_id}); "
            "the service's operator can look it up in the worker log",
            "level": "error",
            "data": {"error_id": error_id},
        }
    # The exception (and its traceback, which held the frames that held the images, the model
    # state and the optimiser) is gone once its ``except`` block ends: free that memory now, before
    # this worker takes its next job.
    memory = release_memory()
    if final is not None:
        if watch.lost.is_set():
            log.warning("job %s: attempt %d lost the job to the reaper; leaving it alone", job_id, attempt)
            return "lost"
        status = final.pop("status")
        data = {**memory, **final.pop("data", {})}
        outcome = (
            status if _set_final(sessions, job_id, attempt, status, data=data or None, **final) else "skipped"
        )
    if outcome in TERMINAL:
        _delete_checkpoint(storage, job_id)
    # Its slot is free: the owner's next waiting job goes to the workers (a stopping worker leaves
    # that, and its requeued job, to the reaper, rather than send messages it could take itself).
    if SHUTDOWN.is_set():
        return outcome
    try:
        dispatch(sessions, settings, job.owner_id)
    except Exception:  # the reaper's next pass does it
        log.warning("could not dispatch the next job of owner %s", job.owner_id, exc_info=True)
    return outcome


def _requeue_for_shutdown(
    sessions: sessionmaker[Session], job_id: str, attempt: int, stage: str, step: int
) -> str:
    """Put a job this worker stopped for its shutdown back in the queue (no message yet:
    ``dispatch`` sends one). Returns "requeued", or "skipped" when the job is no longer this
    attempt's running job (a cancel request that came meanwhile is honoured: "cancelled")."""
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.attempts != attempt or job.status not in LIVE:
            return "skipped"
        if job.status == "cancelling":
            _finish(session, job, "cancelled", message=f"cancelled during {stage} after {step} steps")
            session.commit()
            return "cancelled"
        job.status = "queued"
        job.enqueued_at = None
        job.worker_id = None
        job.eta_seconds = None
        jobs.add_event(
            session,
            job.id,
            "log",
            stage=stage,
            level="warning",
            message=f"the worker shut down during {stage} after {step} steps; the job is queued "
            "again and resumes from its checkpoint",
            data={"step": step, "attempt": attempt},
        )
        session.commit()
    log.warning("job %s: stopped for the worker's shutdown at %s step %d; queued again", job_id, stage, step)
    return "requeued"


def release_memory() -> dict[str, int]:
    """Collect garbage (whatever a reference cycle still holds) and give the CUDA caching
    allocator's free blocks back to the driver, so the next job, or another process on this GPU,
    gets the memory. Returns the CUDA memory still allocated and reserved, when CUDA is in use."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        return {
            "cuda_allocated_bytes": int(torch.cuda.memory_allocated()),
            "cuda_reserved_bytes": int(torch.cuda.memory_reserved()),
        }
    return {}


def _llm(settings: Settings) -> LLMClient | None:
    if not (settings.llm_base_url or settings.llm_api_key):
        return None
    kwargs: dict[str, Any] = {"base_url": settings.llm_base_url, "api_key": settings.llm_api_key}
    if settings.llm_model:
        kwargs["model"] = settings.llm_model
    return LLMClient(LLMConfig(timeout_s=settings.llm_timeout_s, **kwargs))


def _load_images(storage: BlobStorage, keys: list[str], size: int) -> ImageCache:
    return ImageCache.from_sources([storage.get(k) for k in keys], size)


def _warning(code: str, message: str, **data: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **data}


def _execute(
    job: Job,
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: BlobStorage,
    reporter: JobReporter,
    watch: JobWatch,
) -> Outcome:
    writers: list[CheckpointWriter] = []

    def cancel() -> bool:
        if watch.should_stop():
            return True
        if SHUTDOWN.is_set():
            for writer in writers:  # stage 2: keep its last step before stopping
                writer.flush()
            return True
        return False

    names = list(job.class_names)
    text_config, adapt_config = to_configs(job.hyperparameters, job.recipe)
    warnings: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    saved: Saved | None = None
    if job.attempts > 1:  # a re-run after a lost worker: continue from what the last attempt saved
        saved = load_checkpoint(storage, job, _inputs_digest(job, _image_keys(sessions, job)[0]))
        reporter.log(
            f"attempt {job.attempts}: "
            + (
                f"resuming from the checkpoint at stage-2 step {saved.adapt.step}"
                if saved
                else "no usable checkpoint, starting over"
            ),
            level="warning",
            data={"attempt": job.attempts, "resume_step": saved.adapt.step if saved else 0},
        )

    # --- describing ------------------------------------------------------------------------
    reporter.start_stage("describing", f"loading base model {job.base_model}")
    t = time.perf_counter()
    backbone = _backbone(job.base_model, settings)
    metrics["base_model_load_s"] = round(time.perf_counter() - t, 3)
    desc_in = dict(job.descriptions)
    source = desc_in.get("source", "auto")
    config = DescriptionConfig(
        source=source,
        per_class=int(desc_in.get("per_class") or 10),
        domain=desc_in.get("domain"),
        provided=desc_in.get("provided"),
        on_llm_failure="fail" if source == "llm" else "templates",
    )
    desc_cache = DbDescriptionCache(sessions)
    t = time.perf_counter()
    llm = _llm(settings)
    try:
        desc = generate_descriptions(
            names, config, llm=llm, cache=desc_cache, progress=reporter, should_cancel=cancel
        )
    finally:
        if llm is not None:
            llm.close()
    timings["describing"] = time.perf_counter() - t
    for note in desc.warnings:
        warnings.append(_warning("descriptions", note))
    reporter.log(
        f"{len(desc.sentences)} sentences from {desc.source_used}; description cache {desc_cache.hits} hits, "
        f"{desc_cache.misses} misses",
        data={"source_used": desc.source_used, "hits": desc_cache.hits, "misses": desc_cache.misses},
    )

    # --- encoding_text ---------------------------------------------------------------------
    reporter.start_stage("encoding_text")
    emb_cache = DbEmbeddingCache(sessions)
    t = time.perf_counter()
    embeddings = embed_sentences(backbone, desc.sentences, cache=emb_cache)
    timings["encoding_text"] = time.perf_counter() - t
    reporter(_point("encoding_text", {"sentences": len(desc.sentences)}))
    reporter.log(
        f"embedded {len(desc.sentences)} sentences; "
        f"embedding cache {emb_cache.hits} hits, {emb_cache.misses} misses",
        data={"hits": emb_cache.hits, "misses": emb_cache.misses},
    )
    metrics["cache"] = {
        "descriptions": {"hits": desc_cache.hits, "misses": desc_cache.misses},
        "embeddings": {"hits": emb_cache.hits, "misses": emb_cache.misses},
    }
    metrics["descriptions"] = {"source_used": desc.source_used, "sentences": len(desc.sentences)}

    # --- training_text_classifier ----------------------------------------------------------
    t = time.perf_counter()
    if saved is not None:
        # Stage 2's teacher is this head: it must be the very head the checkpointed run started from.
        reporter.start_stage("training_text_classifier", "restored the text classifier from the checkpoint")
        text = saved.text
    else:
        reporter.start_stage("training_text_classifier")
        text = train_text_classifier(
            embeddings,
            desc.labels,
            len(names),
            text_config,
            seed=job.seed,
            device=backbone.device,
            progress=reporter,
            should_cancel=cancel,
        )
    timings["training_text_classifier"] = time.perf_counter() - t
    metrics["text_classifier"] = {
        "steps": text.steps,
        "final_loss": round(text.final_loss, 5),
        "train_accuracy": round(text.train_accuracy, 4),
    }

    # --- adapting --------------------------------------------------------------------------
    reporter.start_stage("adapting", "decoding the dataset's images")
    train_keys, eval_items = _image_keys(sessions, job)
    if len(train_keys) < 2:
        raise StageError(
            "dataset_too_small",
            "the dataset has fewer than 2 unlabelled images "
            "(was it deleted or emptied after the job was queued?)",
        )
    images = _load_images(storage, train_keys, backbone.image_size)
    t = time.perf_counter()
    writer = CheckpointWriter(storage, settings, reporter, job.id, _inputs_digest(job, train_keys), text)
    writers.append(writer)

    def run_stage2(resume: AdaptCheckpoint | None) -> AdaptResult:
        return adapt(
            backbone,
            text.head,
            images,
            names,
            adapt_config,
            seed=job.seed,
            progress=reporter,
            should_cancel=cancel,
            checkpoint=writer,
            resume_from=resume,
        )

    try:
        result = run_stage2(saved.adapt if saved else None)
    except InvalidInputError as exc:
        if saved is None:
            raise
        # Refused before any step (the run differs from the checkpointed one): start stage 2 over.
        reporter.log(f"the checkpoint does not fit this run ({exc}); stage 2 starts over", level="warning")
        result = run_stage2(None)
    timings["adapting"] = time.perf_counter() - t
    resolved = _echo(job.hyperparameters, text, result)
    metrics["adapting"] = {
        "steps": result.steps,
        "images": len(images),
        "images_per_s": round(result.images_per_s, 2),
        "pseudo_label_histogram": dict(zip(names, result.pseudo_label_histogram, strict=True)),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "resumed_from_step": result.resumed_from_step,
        # the adapted tensors, served or not: two runs of one request can be compared by this
        "tensors_sha256": tensors_sha256(result.model.tensors),
    }

    # --- evaluating ------------------------------------------------------------------------
    # Which classifier to serve is the library's decision (``lafter.guard``), the same one the
    # command line makes: by accuracy on the labelled split when there is one, else label-free.
    reporter.start_stage("evaluating")
    t = time.perf_counter()
    index = {class_key(n): i for i, n in enumerate(names)}
    labelled = [(key, index[class_key(label)]) for key, label in eval_items if class_key(label) in index]
    unknown = len(eval_items) - len(labelled)
    if unknown:
        warnings.append(
            _warning(
                "eval_labels_unknown",
                f"{unknown} evaluation image(s) have labels that are not among the job's class names; "
                "they were ignored",
            )
        )
    eval_images = _load_images(storage, [k for k, _ in labelled], backbone.image_size) if labelled else None
    reporter(_point("evaluating", {}, step=1, total=2))
    candidates = {
        "zero_shot": AdaptedModel.zero_shot(backbone, names),
        "text_classifier": AdaptedModel.from_text_head(
            backbone.spec, names, text.head, metadata={"steps": text.steps}
        ),
        "lafter": result.model,
    }
    chosen = evaluate_candidates(
        backbone, candidates, images, eval_images, [c for _, c in labelled] if labelled else None
    )
    evaluation = chosen.report
    warnings.extend(chosen.warnings)
    reporter.log(
        chosen.reason,
        level="warning" if chosen.served != "lafter" else "info",
        data={
            "served": chosen.served,
            **({"accuracy": evaluation["labelled"]["accuracy"]} if labelled else {}),
        },
    )
    timings["evaluating"] = time.perf_counter() - t
    diagnostics = evaluation.get("diagnostics", {})
    metrics["evaluation"] = {
        "mean_confidence": {k: v["mean_confidence"] for k, v in diagnostics.items()},
        "agreement_with_zero_shot": diagnostics.get("lafter", {}).get("agreement_with_zero_shot"),
        **({"accuracy": evaluation["labelled"]["accuracy"]} if "labelled" in evaluation else {}),
    }
    metrics["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["served"] = chosen.served
    # What else the tensors depend on: on a CPU, the intra-op thread count changes the order of
    # floating-point sums (LAFTER_TORCH_THREADS; 0 leaves torch's default, the core count).
    metrics["runtime"] = {
        "device": str(backbone.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

    served = candidates[chosen.served]
    served.metadata.update({"job_id": job.id, "descriptions_source": desc.source_used})
    return Outcome(
        served=served, metrics=metrics, evaluation=evaluation, warnings=warnings, hyperparameters=resolved
    )


def _echo(submitted: dict[str, Any], text: TextClassifierResult, result: AdaptResult) -> dict[str, Any]:
    """The job's hyperparameters as the run really used them: every "auto" and every recipe choice
    resolved (stage 2's from ``AdaptResult.resolved``), plus what they resolved into (steps, the
    trainable parameter count, the precision and device)."""
    used = result.resolved
    echoed = {key: used[key] for key in ECHOED_ADAPT if key in used}
    return {
        **{k: v for k, v in submitted.items() if k in HyperparametersIn.model_fields},
        **echoed,
        "text_steps": text.steps,
        "strong_crop_scale": list(used["strong_crop_scale"]),
        "strong_blur_sigma": list(used["strong_blur_sigma"]),
    }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes, in name order): equal digests mean
    bitwise equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _point(stage: str, metrics: dict[str, Any], *, step: int = 1, total: int = 1) -> ProgressEvent:
    """A progress report for a stage the library does not report on by itself."""
    return ProgressEvent(stage, step, total, metrics)


def _register(job: Job, outcome: Outcome, sessions: sessionmaker[Session], reporter: JobReporter) -> str:
    reporter.start_stage("registering")
    data = outcome.served.to_bytes()
    checksum = outcome.served.checksum
    with sessions() as session:
        row = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
        if row is None or row.attempts != job.attempts:
            return "skipped"  # the job was given to another attempt while this one worked
        if row.status != "running":
            # Asked to cancel (or finished elsewhere) while we worked: honour it, register nothing.
            if row.status == "cancelling":
                _finish(session, row, "cancelled", message="cancelled before the model was registered")
                session.commit()
                return "cancelled"
            return "skipped"
        model = Model(
            id=new_id("model"),
            owner_id=row.owner_id,
            job_id=row.id,
            base_model=outcome.served.base_spec,
            class_names=list(outcome.served.class_names),
            kind=outcome.served.kind,
            checksum=checksum,
            size_bytes=len(data),
            num_parameters=outcome.served.num_parameters,
            metrics=outcome.metrics,
            evaluation=outcome.evaluation,
            warnings=outcome.warnings,
            metadata_={"descriptions_source": outcome.served.metadata.get("descriptions_source")},
        )
        session.add(model)
        session.flush()
        session.add(ModelArtifact(model_id=model.id, data=data, checksum=checksum))
        row.model_id = model.id
        row.metrics = outcome.metrics
        row.warnings = outcome.warnings
        row.hyperparameters = outcome.hyperparameters
        row.stage = "registering"
        row.percent = 100.0
        row.stage_percent = 100.0
        _finish(session, row, "succeeded", message=f"registered model {model.id} ({outcome.served.kind})")
        session.commit()
    return "succeeded"


# --- checkpoints ---------------------------------------------------------------------------------


def _image_keys(sessions: sessionmaker[Session], job: Job) -> tuple[list[str], list[tuple[str, str]]]:
    """The storage keys of the training images, and (key, label) of the evaluation split, both in
    content order (the SHA-256 of the bytes; sorted here, not by the database's collation). Stage 2
    draws its batches by position, so an order that followed uploads (row ids) would make the same
    request on the same images train a different model when they were uploaded in another order or
    into another dataset."""
    with sessions() as session:
        train_rows = datasets.train_images(session, job.dataset_id) if job.dataset_id else []
        eval_rows = datasets.eval_images(session, job.dataset_id) if job.dataset_id else []
        train = sorted(train_rows, key=lambda r: r.sha256)
        evaluation = sorted(eval_rows, key=lambda r: r.sha256)
        return [r.storage_key for r in train], [(r.storage_key, r.label or "") for r in evaluation]


def _inputs_digest(job: Job, train_keys: list[str]) -> str:
    """What a checkpoint was made from: a run on other images or settings must not resume it."""
    fields = {
        "base_model": job.base_model,
        "class_names": list(job.class_names),
        "descriptions": job.descriptions,
        "recipe": job.recipe,
        "hyperparameters": job.hyperparameters,
        "seed": job.seed,
        "images": train_keys,  # content-addressed keys
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Saved:
    """What an earlier attempt left: the stage-1 head stage 2 started from, and stage 2's state."""

    text: TextClassifierResult
    adapt: AdaptCheckpoint


CHECKPOINT_FORMAT = 1


class CheckpointWriter:
    """The ``adapt`` checkpoint hook: after every step it moves the row's progress, and every
    ``LAFTER_CHECKPOINT_EVERY_S`` seconds or ``LAFTER_CHECKPOINT_EVERY_STEPS`` steps (and at the last
    step, so a crash while evaluating does not redo stage 2) it stores the run's state under the
    job in blob storage."""

    def __init__(
        self,
        storage: BlobStorage,
        settings: Settings,
        reporter: JobReporter,
        job_id: str,
        inputs: str,
        text: TextClassifierResult,
    ) -> None:
        self.storage = storage
        self.reporter = reporter
        self.key = jobs.checkpoint_key(job_id)
        self.every_s = settings.checkpoint_every_s
        self.every_steps = settings.checkpoint_every_steps
        self.header = {
            "format": CHECKPOINT_FORMAT,
            "inputs": inputs,
            "text": {
                "head": text.head.weight.detach().cpu().clone(),
                "steps": text.steps,
                "final_loss": text.final_loss,
                "train_accuracy": text.train_accuracy,
            },
        }
        self.last = time.monotonic()
        # The latest step and its snapshot, for ``flush`` (the snapshot reads the live state, which
        # is that step's until the next one runs); the step last stored.
        self.latest: tuple[int, int, Callable[[], AdaptCheckpoint]] | None = None
        self.saved_step = -1

    def __call__(self, step: int, total: int, snapshot: Callable[[], AdaptCheckpoint]) -> None:
        self.reporter.step(step, total)
        self.latest = (step, total, snapshot)
        if not (self.every_s or self.every_steps):
            return
        now = time.monotonic()
        due = (
            step >= total
            or (self.every_steps and step % self.every_steps == 0)
            or (self.every_s and now - self.last >= self.every_s)
        )
        if due:
            self._save(step, total, snapshot)

    def flush(self) -> None:
        """Store the latest step's state now, unless it is stored already (the worker is stopping:
        called between two steps, by the cancel check)."""
        if self.latest is not None and self.latest[0] != self.saved_step:
            self._save(*self.latest)

    def _save(self, step: int, total: int, snapshot: Callable[[], AdaptCheckpoint]) -> None:
        buf = io.BytesIO()
        torch.save({**self.header, "adapt": snapshot().to_dict()}, buf)
        try:
            self.storage.put(self.key, buf.getvalue())
        except Exception:  # training goes on; a re-run would start from an older checkpoint
            log.warning("could not store the checkpoint of job %s", self.reporter.job_id, exc_info=True)
            return
        self.last = time.monotonic()
        self.saved_step = step
        self.reporter.log(f"checkpoint at step {step} of {total}", data={"checkpoint_step": step})


def load_checkpoint(storage: BlobStorage, job: Job, inputs: str) -> Saved | None:
    """The job's checkpoint if there is one and it was made from these inputs, else None."""
    key = jobs.checkpoint_key(job.id)
    try:
        if not storage.exists(key):
            return None
        data = torch.load(io.BytesIO(storage.get(key)), map_location="cpu", weights_only=True)
        if data.get("format") != CHECKPOINT_FORMAT or data.get("inputs") != inputs:
            log.warning("job %s: the checkpoint is for other inputs; starting over", job.id)
            return None
        weight = data["text"]["head"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
        with torch.no_grad():
            head.weight.copy_(weight)
        text = TextClassifierResult(
            head=head,
            steps=int(data["text"]["steps"]),
            final_loss=float(data["text"]["final_loss"]),
            train_accuracy=float(data["text"]["train_accuracy"]),
            seconds=0.0,
            resolved={"restored_from_checkpoint": True},
        )
        return Saved(text=text, adapt=AdaptCheckpoint.from_dict(data["adapt"]))
    except Exception:  # an unreadable checkpoint costs the time it saved, nothing else
        log.warning("job %s: could not read its checkpoint; starting over", job.id, exc_info=True)
        return None


def _delete_checkpoint(storage: BlobStorage, job_id: str) -> None:
    try:
        storage.delete(jobs.checkpoint_key(job_id))
    except Exception:
        log.warning("could not delete the checkpoint of job %s", job_id, exc_info=True)
