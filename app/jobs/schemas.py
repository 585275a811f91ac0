from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, UrlConstraints

from app.core.fields import JsonObject, Text

Auto = Literal["auto"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class DescriptionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["auto", "llm", "templates", "provided"] = "auto"
    per_class: int | None = Field(default=None, ge=1, le=100)
    domain: Text | None = Field(default=None, max_length=200, description="e.g. 'sketch', 'satellite photo'")
    provided: dict[Text, list[Text]] | None = None


class HyperparametersIn(BaseModel):
    """Each value is "auto" (resolved by the library and echoed back on the job) or a number."""

    model_config = ConfigDict(extra="forbid")

    text_steps: int | Auto = Field(default="auto", description="stage 1 steps")
    text_learning_rate: float = Field(default=5e-4, gt=0, le=1)
    text_weight_decay: float = Field(default=0.01, ge=0, le=1)
    noise_std: float = Field(default=0.1, ge=0, le=10)
    text_init: Literal["default", "zeroshot"] = "default"
    epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    prompt_tokens: int = Field(default=50, ge=1, le=1000)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1, description="cap on stage 2 optimiser steps")
    pseudo_label_balance: Literal["none", "align"] = Field(
        default="none",
        description="'none' is the method; 'align' divides the teacher's probabilities by their running "
        "mean (distribution alignment) so a biased teacher does not starve classes",
    )

    def model_post_init(self, _context: Any) -> None:
        for name in ("text_steps", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name} must be >= 1 or 'auto'")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: Text
    class_names: list[Text]
    base_model: Text = Field(
        "ViT-B-32::openai",
        max_length=1000,  # the column's width
        description="any spec lafter accepts; see GET /v1/base-models",
    )
    descriptions: DescriptionsIn = Field(default_factory=DescriptionsIn)
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    metadata: JsonObject = Field(default_factory=dict)
    webhook_url: Annotated[HttpUrl, UrlConstraints(max_length=2000)] | None = None  # the column's width


class Progress(BaseModel):
    percent: float
    stage_percent: float
    step: int
    total_steps: int
    eta_seconds: float | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: JobStatus
    stage: str | None
    dataset_id: str | None
    base_model: str
    class_names: list[str]
    descriptions: dict[str, Any]
    progress: Progress
    hyperparameters: dict[str, Any]
    seed: int
    error: JobError | None = None
    model_id: str | None = None
    metrics: dict[str, Any]
    warnings: list[dict[str, Any]]
    metadata: dict[str, Any]
    webhook_url: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(
        default=None,
        description="for a queued job waiting for one of its owner's slots (LAFTER_MAX_ACTIVE_JOBS_PER_OWNER): "
        "1 = the next to run; null once it is sent to the workers, running or finished",
    )
    attempts: int = Field(default=0, description="runs so far; > 1 after a lost worker's job was re-run")


class JobEventOut(BaseModel):
    id: int
    created_at: datetime
    kind: Literal["log", "metric"]
    level: str
    stage: str | None
    step: int | None
    message: str | None
    data: dict[str, Any]
