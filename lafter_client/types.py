"""The service's answers as pydantic models. Fields the service adds later are kept (``extra``), so
an older client keeps working against a newer service."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Dataset(_Model):
    id: str
    name: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: str = "empty"
    image_count: int = 0
    eval_image_count: int = 0
    total_bytes: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AcceptedFile(_Model):
    filename: str
    image_id: str
    sha256: str
    width: int | None = None
    height: int | None = None
    split: str = "train"
    label: str | None = None


class DuplicateFile(_Model):
    filename: str
    image_id: str
    sha256: str


class RejectedFile(_Model):
    filename: str
    code: str
    message: str


class UploadReport(_Model):
    """What an upload did, per file, over all the requests it took. File names are the caller's:
    paths relative to the uploaded folder, or the files' own names."""

    dataset_id: str
    accepted: list[AcceptedFile] = Field(default_factory=list)
    duplicates: list[DuplicateFile] = Field(default_factory=list)
    rejected: list[RejectedFile] = Field(default_factory=list)
    dataset: Dataset | None = None
    requests: int = 0


class JobProgress(_Model):
    percent: float = 0.0
    stage_percent: float = 0.0
    step: int = 0
    total_steps: int = 0
    eta_seconds: float | None = None


class JobError(_Model):
    code: str
    message: str = ""


class Job(_Model):
    id: str
    status: str
    stage: str | None = None
    dataset_id: str | None = None
    base_model: str = ""
    class_names: list[str] = Field(default_factory=list)
    descriptions: dict[str, Any] = Field(default_factory=dict)
    recipe: str | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    error: JobError | None = None
    model_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook_url: str | None = None
    created_at: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_position: int | None = None
    attempts: int = 0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class JobEvent(_Model):
    """A log line (``kind == "log"``) or a metric point (``kind == "metric"``: ``data`` holds e.g.
    ``loss``, ``images_per_s``, ``pseudo_label_histogram``, ``percent``). ``id`` numbers a job's
    events 1, 2, 3..."""

    id: int
    created_at: datetime | None = None
    kind: str
    level: str = "info"
    stage: str | None = None
    step: int | None = None
    message: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Model(_Model):
    id: str
    job_id: str | None = None
    base_model: str
    class_names: list[str]
    kind: str = "lafter"
    checksum: str | None = None
    size_bytes: int = 0
    num_parameters: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    warnings: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


class Prediction(_Model):
    label: str
    score: float


class ImagePredictions(_Model):
    index: int
    filename: str | None = None
    predictions: list[Prediction]

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


class Classification(_Model):
    model_id: str | None = None
    base_model: str
    kind: str
    top_k: int
    data: list[ImagePredictions]


T = TypeVar("T")


class Page(_Model, Generic[T]):
    data: list[T]
    has_more: bool = False
    next_cursor: str | None = None
