"""One job's run of the method: what the job row asks for becomes a ``lafter.run_lafter`` call with
the service's caches, progress, cancel check and checkpoints; what it returns becomes an ``Outcome``
to register."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.base_models.service import allowed
from app.caches.store import DbDescriptionCache, DbEmbeddingCache
from app.core.backbones import load_base
from app.core.errors import ApiError
from app.core.lru import LRU
from app.core.settings import Settings
from app.core.storage import BlobStorage
from app.datasets import repository as datasets
from app.jobs.schemas import HyperparametersIn, to_configs
from app.jobs.tables import Job
from lafter.backbone import Backbone
from lafter.descriptions import DescriptionConfig, class_key
from lafter.llm import LLMClient, LLMConfig
from lafter.pipeline import LafterRun, run_lafter
from lafter.views import ImageCache
from worker import checkpoints
from worker.registration import Outcome
from worker.reporter import JobReporter, JobWatch

log = logging.getLogger(__name__)

# What ``echo`` takes from stage 2's resolved settings, beside the request's own keys.
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


@dataclass
class StageError(Exception):
    """A failure a user can act on, raised by the worker itself (not by ``lafter``)."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


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


def _llm(settings: Settings) -> LLMClient | None:
    if not (settings.llm_base_url or settings.llm_api_key):
        return None
    kwargs: dict[str, Any] = {"base_url": settings.llm_base_url, "api_key": settings.llm_api_key}
    if settings.llm_model:
        kwargs["model"] = settings.llm_model
    return LLMClient(LLMConfig(timeout_s=settings.llm_timeout_s, **kwargs))


def _description_config(job: Job) -> DescriptionConfig:
    desc = dict(job.descriptions)
    source = desc.get("source", "auto")
    return DescriptionConfig(
        source=source,
        per_class=int(desc.get("per_class") or DescriptionConfig.per_class),
        domain=desc.get("domain"),
        provided=desc.get("provided"),
        on_llm_failure="fail" if source == "llm" else "templates",
    )


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


def _load_images(storage: BlobStorage, keys: list[str], size: int) -> ImageCache:
    return ImageCache.from_sources([storage.get(k) for k in keys], size)


def execute(
    job: Job,
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: BlobStorage,
    reporter: JobReporter,
    watch: JobWatch,
    shutdown: threading.Event,
) -> Outcome:
    """Run the job's method end to end and return what to register. Raises ``Cancelled`` when its
    owner cancels, the job is lost, or this worker stops (``shutdown``: after storing a checkpoint)."""
    names = list(job.class_names)
    text_config, adapt_config = to_configs(job.hyperparameters, job.recipe)
    warnings: list[dict[str, Any]] = []
    train_keys, eval_items = _image_keys(sessions, job)
    inputs = checkpoints.inputs_digest(job, train_keys)
    saved = None
    if job.attempts > 1:  # a re-run after a lost worker: continue from what the last attempt saved
        saved = checkpoints.load(storage, job.id, inputs)
        reporter.log(
            f"attempt {job.attempts}: "
            + (
                f"resuming from the checkpoint at stage-2 step {saved.step}"
                if saved
                else "no usable checkpoint, starting over"
            ),
            level="warning",
            data={"attempt": job.attempts, "resume_step": saved.step if saved else 0},
        )
    writer = checkpoints.CheckpointWriter(storage, settings, reporter, job.id, inputs)

    def cancel() -> bool:
        if watch.should_stop():
            return True
        if shutdown.is_set():
            writer.flush()  # stage 2: keep its last step before stopping
            return True
        return False

    reporter.start_stage("describing", f"loading base model {job.base_model}")
    t = time.perf_counter()
    backbone = _backbone(job.base_model, settings)
    base_model_load_s = round(time.perf_counter() - t, 3)
    if len(train_keys) < 2:
        raise StageError(
            "dataset_too_small",
            "the dataset has fewer than 2 unlabelled images "
            "(was it deleted or emptied after the job was queued?)",
        )
    images = _load_images(storage, train_keys, backbone.image_size)
    index = {class_key(n): i for i, n in enumerate(names)}
    labelled = [(key, index[class_key(label)]) for key, label in eval_items if class_key(label) in index]
    if len(labelled) < len(eval_items):
        warnings.append(
            {
                "code": "eval_labels_unknown",
                "message": f"{len(eval_items) - len(labelled)} evaluation image(s) have labels that are "
                "not among the job's class names; they were ignored",
            }
        )
    eval_images = _load_images(storage, [k for k, _ in labelled], backbone.image_size) if labelled else None

    desc_cache, emb_cache = DbDescriptionCache(sessions), DbEmbeddingCache(sessions)
    llm = _llm(settings)
    try:
        run = run_lafter(
            backbone,
            names,
            images,
            descriptions=_description_config(job),
            llm=llm,
            description_cache=desc_cache,
            embedding_cache=emb_cache,
            text_config=text_config,
            adapt_config=adapt_config,
            seed=job.seed,
            progress=reporter,
            should_cancel=cancel,
            eval_images=eval_images,
            eval_labels=[c for _, c in labelled] if labelled else None,
            checkpoint=writer,
            resume_from=saved,
        )
    finally:
        if llm is not None:
            llm.close()
    cache = {
        "descriptions": {"hits": desc_cache.hits, "misses": desc_cache.misses},
        "embeddings": {"hits": emb_cache.hits, "misses": emb_cache.misses},
    }
    reporter.log(
        f"description cache {desc_cache.hits} hits, {desc_cache.misses} misses; "
        f"embedding cache {emb_cache.hits} hits, {emb_cache.misses} misses",
        data=cache,
    )
    served = run.served_model
    served.metadata.update({"job_id": job.id, "descriptions_source": run.descriptions.source_used})
    return Outcome(
        served=served,
        metrics={"base_model_load_s": base_model_load_s, "cache": cache, **run.metrics()},
        evaluation=run.evaluation,
        warnings=run.descriptions_warnings() + warnings + (run.guard.warnings if run.guard else []),
        hyperparameters=echo(job.hyperparameters, run),
    )


def echo(submitted: dict[str, Any], run: LafterRun) -> dict[str, Any]:
    """The job's hyperparameters as the run really used them: every "auto" and every recipe choice
    resolved (stage 2's from ``AdaptResult.resolved``), plus what they resolved into (steps, the
    trainable parameter count, the precision and device)."""
    used = run.adaptation.resolved
    echoed = {key: used[key] for key in ECHOED_ADAPT if key in used}
    return {
        **{k: v for k, v in submitted.items() if k in HyperparametersIn.model_fields},
        **echoed,
        "text_steps": run.text.steps,
        "strong_crop_scale": list(used["strong_crop_scale"]),
        "strong_blur_sigma": list(used["strong_blur_sigma"]),
    }
