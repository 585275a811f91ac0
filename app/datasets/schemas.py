from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.fields import JsonObject, Text


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=200)
    metadata: JsonObject = Field(default_factory=dict)


class DatasetOut(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    name: str
    metadata: dict[str, Any]
    status: Literal["empty", "ready"]
    image_count: int = Field(description="images available for training (unlabelled split)")
    eval_image_count: int = Field(description="labelled images, used only for evaluation")
    total_bytes: int
    created_at: datetime
    updated_at: datetime


class DatasetImageOut(BaseModel):
    object: Literal["dataset_image"] = "dataset_image"
    id: str
    filename: str
    format: str
    width: int
    height: int
    bytes: int = Field(description="size of the stored file")
    sha256: str
    split: Literal["train", "eval"]
    label: str | None = Field(description="the class of an evaluation image; null in the training split")
    created_at: datetime


class AcceptedFile(BaseModel):
    filename: str
    image_id: str
    sha256: str
    width: int
    height: int
    split: Literal["train", "eval"]
    label: str | None = None


class DuplicateFile(BaseModel):
    filename: str
    image_id: str
    sha256: str


class RejectedFile(BaseModel):
    filename: str
    code: str
    message: str


class UploadReport(BaseModel):
    dataset_id: str
    accepted: list[AcceptedFile]
    duplicates: list[DuplicateFile] = Field(description="same SHA-256 as an image already stored: kept once")
    rejected: list[RejectedFile]
    dataset: DatasetOut
