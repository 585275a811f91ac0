from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelOut(BaseModel):
    object: Literal["model"] = "model"
    id: str
    job_id: str | None
    base_model: str
    class_names: list[str]
    kind: Literal["lafter", "text_classifier", "zero_shot"] = Field(
        description="which of the three classifiers is served (see evaluation.selection)"
    )
    checksum: str
    size_bytes: int = Field(description="size of the stored delta")
    num_parameters: int
    metrics: dict[str, Any]
    evaluation: dict[str, Any]
    warnings: list[dict[str, Any]]
    metadata: dict[str, Any]
    created_at: datetime


class Prediction(BaseModel):
    label: str
    score: float


class ImagePredictions(BaseModel):
    index: int
    filename: str | None = None
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    object: Literal["classification"] = "classification"
    model_id: str | None = None
    base_model: str
    kind: str
    top_k: int
    data: list[ImagePredictions]


class ClassifyJSON(BaseModel):
    """JSON alternative to multipart: images as base64 strings."""

    images: list[str] = Field(min_length=1, description="base64-encoded image files")
    filenames: list[str] | None = None
    top_k: int = Field(default=5, ge=1)
    base_model: str | None = None
    class_names: list[str] | None = None
