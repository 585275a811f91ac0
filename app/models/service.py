"""Model rules: presentation, deletion, classification (adapted and zero-shot). Never commits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy.orm import Session

from app.base_models.service import validate_spec
from app.core.auth import Owner
from app.core.errors import Invalid, NotFound, TooLarge
from app.core.metrics import CLASSIFIED_IMAGES
from app.core.settings import Settings
from app.datasets.images import SIZE_CODES, Candidate, Rejection, decode_for_prediction
from app.datasets.service import limits_from
from app.jobs import repository as jobs
from app.jobs import transitions
from app.models import repository
from app.models.runtime import ModelRow, ModelRuntime
from app.models.schemas import ClassifyResponse, ImagePredictions, ModelOut, Prediction
from app.models.tables import Model
from lafter.descriptions import validate_class_names
from lafter.errors import LafterError
from lafter.predict import AdaptedClassifier, top_k_labels


@dataclass(frozen=True)
class NamedImage:
    filename: str | None
    data: bytes


def to_out(model: Model) -> ModelOut:
    return ModelOut(
        id=model.id,
        job_id=model.job_id,
        base_model=model.base_model,
        class_names=list(model.class_names),
        kind=model.kind,  # type: ignore[arg-type]
        checksum=model.checksum,
        size_bytes=model.size_bytes,
        num_parameters=model.num_parameters,
        metrics=model.metrics,
        evaluation=model.evaluation,
        warnings=list(model.warnings),
        metadata=model.metadata_,
        created_at=model.created_at,
    )


def get(session: Session, owner: Owner, model_id: str) -> Model:
    model = repository.get(session, owner.id, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found", code="model_not_found")
    return model


def delete(session: Session, owner: Owner, model_id: str) -> None:
    """Delete the model; the job that made it stops naming it (``model_id`` null: a succeeded job
    without a model had its model deleted) and its events say so."""
    model = get(session, owner, model_id)
    for job_id in jobs.jobs_of_model(session, owner.id, model.id):
        transitions.detach_model(session, job_id, model.id)
    repository.delete_model(session, model.id)
    session.flush()


def _decode_all(images: Sequence[NamedImage], settings: Settings, size: int) -> torch.Tensor:
    """The request's images as one ``uint8 [N, 3, size, size]`` batch, each decoded once; the first
    bad image refuses the request (its index and code say which and why)."""
    if not images:
        raise Invalid("no images given", code="no_images", field="files")
    if len(images) > settings.classify_max_images:
        raise TooLarge(
            f"at most {settings.classify_max_images} images per request (LAFTER_CLASSIFY_MAX_IMAGES)",
            code="too_many_images",
            field="files",
        )
    limits = limits_from(settings)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        name = img.filename or f"image {i}"
        result = decode_for_prediction(Candidate(name, img.data, None), limits, size)
        if isinstance(result, Rejection):
            cls = TooLarge if result.code in SIZE_CODES else Invalid
            raise cls(f"{name}: {result.message}", code=result.code, field=f"files.{i}")
        out[i] = result
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _classify(
    classifier: AdaptedClassifier,
    images: Sequence[NamedImage],
    top_k: int,
    settings: Settings,
    runtime: ModelRuntime,
) -> list[ImagePredictions]:
    batch = _decode_all(images, settings, classifier.backbone.image_size)
    # One forward pass, shared with the concurrent requests for the same model (app.models.batching).
    probs = runtime.batcher.submit(classifier, batch).result()
    ranked = top_k_labels(probs, classifier.class_names, top_k)
    return [
        ImagePredictions(
            index=i,
            filename=images[i].filename,
            predictions=[Prediction(label=label, score=score) for label, score in row],
        )
        for i, row in enumerate(ranked)
    ]


def classify_with_model(
    session: Session,
    owner: Owner,
    model_id: str,
    images: Sequence[NamedImage],
    top_k: int,
    runtime: ModelRuntime,
    settings: Settings,
) -> ClassifyResponse:
    def row() -> ModelRow:
        m = get(session, owner, model_id)
        return ModelRow(m.id, m.owner_id, m.checksum, m.kind, m.base_model, tuple(m.class_names))

    model = runtime.model_row(owner.id, model_id, row)

    def read() -> bytes:
        data = repository.artifact_bytes(session, model.id)
        if data is None:
            raise NotFound(f"model {model.id} has no stored delta", code="model_artifact_missing")
        return data

    try:
        classifier = runtime.adapted_classifier(model.id, model.checksum, read)
    except LafterError as exc:
        raise Invalid(f"model {model.id} cannot be loaded: {exc}", code=exc.code) from exc
    k = min(top_k, len(model.class_names))
    data = _classify(classifier, images, k, settings, runtime)
    CLASSIFIED_IMAGES.labels(model.kind).inc(len(data))
    return ClassifyResponse(
        model_id=model.id, base_model=model.base_model, kind=model.kind, top_k=k, data=data
    )


def classify_zero_shot(
    base_model: str | None,
    class_names: list[str] | None,
    images: Sequence[NamedImage],
    top_k: int,
    runtime: ModelRuntime,
    settings: Settings,
) -> ClassifyResponse:
    if not base_model:
        raise Invalid("base_model is required", code="base_model_invalid", field="base_model")
    if class_names is None:
        raise Invalid("class_names is required", code="class_names_too_few", field="class_names")
    spec = validate_spec(base_model, settings)
    names = validate_class_names(
        class_names, max_length=settings.max_class_name_length, max_classes=settings.max_classes
    )
    try:
        classifier = runtime.zero_shot_classifier(spec, names)
    except LafterError as exc:
        raise Invalid(
            f"base model {spec!r} cannot be loaded: {exc}", code=exc.code, field="base_model"
        ) from exc
    k = min(top_k, len(names))
    data = _classify(classifier, images, k, settings, runtime)
    CLASSIFIED_IMAGES.labels("zero_shot").inc(len(data))
    return ClassifyResponse(base_model=spec, kind="zero_shot", top_k=k, data=data)
