"""The job pipeline: describing -> encoding_text -> training_text_classifier -> adapting ->
evaluating -> registering. Takes a job id, loads what it needs, calls ``lafter``, and writes
progress, events, the outcome and the model row. Safe to run twice for one id: a finished job is
left alone, a job found running (redelivered after its worker died) starts over."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.caches.store import DbDescriptionCache, DbEmbeddingCache
from app.core.backbones import load_base
from app.core.db import utcnow
from app.core.ids import new_id
from app.core.settings import Settings
from app.core.storage import BlobStorage
from app.datasets import repository as datasets
from app.jobs import repository as jobs
from app.jobs.tables import TERMINAL, Job
from app.models.runtime import LRU
from app.models.tables import Model, ModelArtifact
from lafter import evaluate
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.descriptions import DescriptionConfig, class_text, generate_descriptions
from lafter.errors import Cancelled, LafterError
from lafter.finetune import AdaptConfig, adapt
from lafter.llm import LLMClient, LLMConfig
from lafter.predict import AdaptedClassifier, ZeroShotClassifier
from lafter.progress import ProgressEvent
from lafter.text_cache import embed_sentences
from lafter.text_classifier import TextClassifierConfig, train_text_classifier
from lafter.views import ImageCache
from worker.reporter import Heartbeat, JobReporter

log = logging.getLogger(__name__)

# Label-free diagnostics look at this many training images at most (three forward passes each).
DIAGNOSTIC_IMAGES = 5000

# Loaded base models of this worker process: a cache that says so (safe to lose, bounded).
_BASES: LRU[str, Backbone] | None = None


def _backbone(spec: str, settings: Settings) -> Backbone:
    global _BASES
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


def _claim(sessions: sessionmaker[Session], job_id: str) -> Job | None:
    """Move the job to running, or return None when it must not run (gone, finished, cancelled)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.status in TERMINAL:
            log.info("job %s is already %s; nothing to do", job_id, job.status)
            return None
        if job.status == "cancelling":
            _finish(session, job, "cancelled", message="cancelled before it started")
            session.commit()
            return None
        redelivered = job.status == "running"
        now = utcnow()
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(("queued", "running")))
            .values(
                status="running",
                started_at=now,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                worker_id=f"{socket.gethostname()}:{os.getpid()}",
                stage="describing",
                percent=0.0,
                stage_percent=0.0,
                step=0,
                total_steps=0,
            )
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        if redelivered:
            jobs.add_event(
                session,
                job_id,
                "log",
                level="warning",
                message="redelivered after a worker was lost; starting over",
            )
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
) -> None:
    job.status = status
    job.finished_at = utcnow()
    job.eta_seconds = None
    job.heartbeat_at = job.finished_at
    if code is not None:
        job.error_code = code
        job.error_message = message
    jobs.add_event(session, job.id, "log", stage=job.stage, level=level, message=message or status)


def _set_final(sessions: sessionmaker[Session], job_id: str, status: str, **kwargs: Any) -> None:
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status in TERMINAL:
            return
        _finish(session, job, status, **kwargs)
        session.commit()


def run_job(job_id: str, settings: Settings, sessions: sessionmaker[Session], storage: BlobStorage) -> str:
    """Run one job to a final status and return it. Never raises for a job's own failure."""
    job = _claim(sessions, job_id)
    if job is None:
        return "skipped"
    reporter = JobReporter(
        job_id,
        sessions,
        write_interval_s=settings.progress_write_interval_s,
        cancel_poll_s=settings.cancel_poll_interval_s,
    )
    try:
        with Heartbeat(job_id, sessions, settings.heartbeat_interval_s):
            outcome = _execute(job, settings, sessions, storage, reporter)
            return _register(job, outcome, sessions, reporter)
    except Cancelled as exc:
        _set_final(sessions, job_id, "cancelled", message=f"cancelled during {exc.stage or reporter.stage}")
        return "cancelled"
    except StageError as exc:
        _set_final(sessions, job_id, "failed", code=exc.code, message=exc.message, level="error")
        return "failed"
    except LafterError as exc:
        _set_final(
            sessions, job_id, "failed", code=exc.code, message=f"{reporter.stage}: {exc}", level="error"
        )
        return "failed"
    except SoftTimeLimitExceeded:
        _set_final(
            sessions,
            job_id,
            "failed",
            code="time_limit_exceeded",
            message=f"the job ran past LAFTER_JOB_TIME_LIMIT_S={settings.job_time_limit_s}s "
            f"in {reporter.stage}; "
            "lower epochs or max_steps",
            level="error",
        )
        return "failed"
    except Exception as exc:
        log.exception("job %s failed unexpectedly in %s", job_id, reporter.stage)
        _set_final(
            sessions,
            job_id,
            "failed",
            code="internal_error",
            message=f"unexpected error in stage {reporter.stage}: {type(exc).__name__}: {str(exc)[:300]}; "
            "the worker log has the details",
            level="error",
        )
        return "failed"


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
    job: Job, settings: Settings, sessions: sessionmaker[Session], storage: BlobStorage, reporter: JobReporter
) -> Outcome:
    cancel = reporter.should_cancel
    names = list(job.class_names)
    hp = dict(job.hyperparameters)
    warnings: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}

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
    reporter.start_stage("training_text_classifier")
    t = time.perf_counter()
    text = train_text_classifier(
        embeddings,
        desc.labels,
        len(names),
        TextClassifierConfig(
            steps=hp.get("text_steps", "auto"),
            learning_rate=float(hp.get("text_learning_rate", 5e-4)),
            weight_decay=float(hp.get("text_weight_decay", 0.01)),
            noise_std=float(hp.get("noise_std", 0.1)),
            label_smoothing=float(hp.get("label_smoothing", 0.1)),
            init=hp.get("text_init", "default"),
        ),
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
    with sessions() as session:
        train_rows = datasets.train_images(session, job.dataset_id) if job.dataset_id else []
        eval_rows = datasets.eval_images(session, job.dataset_id) if job.dataset_id else []
        train_keys = [r.storage_key for r in train_rows]
        eval_items = [(r.storage_key, r.label or "") for r in eval_rows]
    if len(train_keys) < 2:
        raise StageError(
            "dataset_too_small",
            "the dataset has fewer than 2 unlabelled images "
            "(was it deleted or emptied after the job was queued?)",
        )
    images = _load_images(storage, train_keys, backbone.image_size)
    t = time.perf_counter()
    result = adapt(
        backbone,
        text.head,
        images,
        names,
        AdaptConfig(
            epochs=hp.get("epochs", "auto"),
            batch_size=hp.get("batch_size", "auto"),
            learning_rate=float(hp.get("learning_rate", 5e-4)),
            weight_decay=float(hp.get("weight_decay", 0.01)),
            prompt_tokens=int(hp.get("prompt_tokens", 50)),
            label_smoothing=float(hp.get("label_smoothing", 0.1)),
            max_steps=hp.get("max_steps"),
        ),
        seed=job.seed,
        progress=reporter,
        should_cancel=cancel,
    )
    timings["adapting"] = time.perf_counter() - t
    resolved = {
        **hp,
        "text_steps": text.steps,
        "epochs": result.epochs,
        "batch_size": int(result.resolved["batch_size"]),
        "max_steps": hp.get("max_steps"),
        "total_steps": int(result.resolved["total_steps"]),
        "steps_per_epoch": int(result.resolved["steps_per_epoch"]),
        "trainable_parameters": int(result.resolved.get("trainable_parameters", 0)),
        "precision": result.resolved.get("precision"),
        "device": result.resolved.get("device"),
    }
    metrics["adapting"] = {
        "steps": result.steps,
        "images": len(images),
        "images_per_s": round(result.images_per_s, 2),
        "pseudo_label_histogram": dict(zip(names, result.pseudo_label_histogram, strict=True)),
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }

    # --- evaluating ------------------------------------------------------------------------
    reporter.start_stage("evaluating")
    t = time.perf_counter()
    zero_shot = ZeroShotClassifier(backbone, names)
    text_model = AdaptedModel.from_text_head(backbone.spec, names, text.head, metadata={"steps": text.steps})
    classifiers: dict[str, AdaptedClassifier] = {
        "zero_shot": zero_shot,
        "text_classifier": AdaptedClassifier(backbone, text_model),
        "lafter": AdaptedClassifier(backbone, result.model),
    }
    sample = images.data[:DIAGNOSTIC_IMAGES]
    probs = {kind: clf.predict_uint8(sample) for kind, clf in classifiers.items()}
    reporter(_point("evaluating", {}, step=1, total=2))
    evaluation: dict[str, Any] = {
        "images": int(sample.shape[0]),
        "diagnostics": evaluate.diagnostics(probs, names),
    }
    collapse = evaluate.detect_collapse(probs["lafter"], probs["zero_shot"], names)
    evaluation["collapse"] = collapse.as_dict()
    served_kind = "lafter"

    index = {class_text(n).casefold(): i for i, n in enumerate(names)}
    labelled = [
        (key, index[class_text(label).casefold()])
        for key, label in eval_items
        if class_text(label).casefold() in index
    ]
    unknown = len(eval_items) - len(labelled)
    if unknown:
        warnings.append(
            _warning(
                "eval_labels_unknown",
                f"{unknown} evaluation image(s) have labels that are not among the job's class names; "
                "they were ignored",
            )
        )
    if labelled:
        eval_images = _load_images(storage, [k for k, _ in labelled], backbone.image_size)
        y = torch.tensor([c for _, c in labelled])
        accuracies = {
            kind: evaluate.accuracy(clf.predict_uint8(eval_images.data), y)
            for kind, clf in classifiers.items()
        }
        selection = evaluate.select_best(accuracies, len(labelled))
        served_kind = selection.kind
        evaluation["labelled"] = {
            "images": len(labelled),
            "accuracy": {k: round(v, 4) for k, v in accuracies.items()},
        }
        evaluation["selection"] = {"served": selection.kind, "reason": selection.reason}
        if selection.worse_than_baseline:
            warnings.append(_warning("adaptation_worse", selection.reason, served=selection.kind))
        reporter.log(selection.reason, data={"accuracy": evaluation["labelled"]["accuracy"]})
    else:
        evaluation["selection"] = {
            "served": "lafter",
            "reason": "no labelled evaluation split: serving the adapted model; see diagnostics and collapse",
        }
        if collapse.collapsed:
            message = (
                "possible self-training collapse: "
                + "; ".join(collapse.reasons)
                + (
                    ". Upload a small labelled evaluation split (split=eval) so the service can pick "
                    "the best model, "
                    "or compare with POST /v1/classify (zero-shot)"
                )
            )
            warnings.append(_warning("collapse_suspected", message, **collapse.as_dict()))
            reporter.log(message, level="warning")
    timings["evaluating"] = time.perf_counter() - t
    metrics["evaluation"] = {
        "mean_confidence": {k: v["mean_confidence"] for k, v in evaluation["diagnostics"].items()},
        "agreement_with_zero_shot": collapse.agreement_with_zero_shot,
        **({"accuracy": evaluation["labelled"]["accuracy"]} if "labelled" in evaluation else {}),
    }
    metrics["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["served"] = served_kind

    if served_kind == "lafter":
        served = result.model
    elif served_kind == "text_classifier":
        served = text_model
    else:
        served = classifiers["zero_shot"].adapted
    served.metadata.update({"job_id": job.id, "descriptions_source": desc.source_used})
    return Outcome(
        served=served, metrics=metrics, evaluation=evaluation, warnings=warnings, hyperparameters=resolved
    )


def _point(stage: str, metrics: dict[str, Any], *, step: int = 1, total: int = 1) -> ProgressEvent:
    """A progress report for a stage the library does not report on by itself."""
    return ProgressEvent(stage, step, total, metrics)


def _register(job: Job, outcome: Outcome, sessions: sessionmaker[Session], reporter: JobReporter) -> str:
    reporter.start_stage("registering")
    data = outcome.served.to_bytes()
    checksum = outcome.served.checksum
    with sessions() as session:
        row = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
        if row is None:
            return "skipped"
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
