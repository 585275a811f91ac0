from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.core.fields import JsonObject, Text
from app.webhooks.schemas import WebhookDelivery
from lafter.finetune import AdaptConfig, Recipe
from lafter.text_classifier import TextClassifierConfig

Auto = Literal["auto"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class DescriptionsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["auto", "llm", "templates", "provided"] = "auto"
    per_class: int | None = Field(default=None, ge=1, le=100)
    domain: Text | None = Field(default=None, max_length=200, description="e.g. 'sketch', 'satellite photo'")
    provided: dict[Text, list[Text]] | None = None


def _default(config: type, name: str) -> Any:
    """A library dataclass field's default: the service states no default of its own."""
    for f in fields(config):
        if f.name == name:
            if f.default is MISSING:
                raise TypeError(f"{config.__name__}.{name} has no plain default")
            return f.default
    raise TypeError(f"{config.__name__} has no field {name!r}")


# Integer hyperparameters: inclusive bounds, checked at submit (422 naming the field).
COUNT_BOUNDS: dict[str, tuple[int, int]] = {
    "text_steps": (1, 100_000),
    "epochs": (1, 1000),
    "batch_size": (1, 4096),
    "prompt_tokens": (1, 1000),
    "max_steps": (1, 10**7),
}


def _count(name: str, value: Any) -> Any:
    """An integer within ``COUNT_BOUNDS[name]`` or "auto"; checked before pydantic's union, so the
    error names the field itself (not one branch of ``int | "auto"``)."""
    low, high = COUNT_BOUNDS[name]
    auto = name != "max_steps"  # max_steps is a number or null (no cap)
    if (value == "auto" and auto) or (value is None and not auto):
        return value
    integral = isinstance(value, float) and value.is_integer()
    if integral or (isinstance(value, str) and value.strip().isdecimal()):
        value = int(value)
    alternative = "'auto'" if auto else "null"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer or {alternative}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, or {alternative}")
    return value


class HyperparametersIn(BaseModel):
    """Each value is "auto" (resolved by the library and the job's ``recipe``, and echoed back on the
    job, resolved) or a value, which always wins over the recipe. Defaults are the library's
    (``lafter.text_classifier.TextClassifierConfig``, ``lafter.finetune.AdaptConfig``)."""

    model_config = ConfigDict(extra="forbid")

    text_steps: int | Auto = Field(
        default=_default(TextClassifierConfig, "steps"), description="stage 1 steps (<= 100000)"
    )
    text_learning_rate: float = Field(default=_default(TextClassifierConfig, "learning_rate"), gt=0, le=1)
    text_weight_decay: float = Field(default=_default(TextClassifierConfig, "weight_decay"), ge=0, le=1)
    noise_std: float = Field(default=_default(TextClassifierConfig, "noise_std"), ge=0, le=10)
    text_init: Literal["default", "zeroshot"] = _default(TextClassifierConfig, "init")
    epochs: int | Auto = Field(
        default=_default(AdaptConfig, "epochs"), description="stage 2 epochs (<= 1000)"
    )
    batch_size: int | Auto = Field(default=_default(AdaptConfig, "batch_size"), description="<= 4096")
    learning_rate: float = Field(default=_default(AdaptConfig, "learning_rate"), gt=0, le=1)
    weight_decay: float = Field(default=_default(AdaptConfig, "weight_decay"), ge=0, le=1)
    prompt_tokens: int | Auto = Field(
        default=_default(AdaptConfig, "prompt_tokens"),
        description="visual prompt tokens (<= 1000); 'auto': the recipe's (paper: 50; default: from "
        "the image tower's patch count)",
    )
    label_smoothing: float = Field(
        default=_default(AdaptConfig, "label_smoothing"), ge=0, lt=1, description="stages 1 and 2"
    )
    max_steps: int | None = Field(
        default=_default(AdaptConfig, "max_steps"), description="cap on stage 2 optimiser steps (<= 10^7)"
    )
    pseudo_label_balance: Literal["none", "align", "auto"] = Field(
        default=_default(AdaptConfig, "pseudo_label_balance"),
        description="'none' is the method (hard argmax); 'align' divides the teacher's probabilities by "
        "their running mean (distribution alignment) so a biased teacher does not starve classes; "
        "'auto': the recipe's (paper: 'none'; default: 'align')",
    )
    balance_tau: float = Field(
        default=_default(AdaptConfig, "balance_tau"),
        gt=0,
        le=2,
        description="strength of 'align': log p - tau * log(running mean)",
    )

    @field_validator(*COUNT_BOUNDS, mode="before")
    @classmethod
    def _counts(cls, value: Any, info: ValidationInfo) -> Any:
        return _count(str(info.field_name), value)


def to_configs(
    hp: HyperparametersIn | Mapping[str, Any], recipe: str
) -> tuple[TextClassifierConfig, AdaptConfig]:
    """The library configs of a job: the one place a request's hyperparameters become lafter's.
    ``hp`` may be a stored job's dict (keys this version does not know are ignored)."""
    if not isinstance(hp, HyperparametersIn):
        hp = HyperparametersIn.model_validate(
            {k: v for k, v in hp.items() if k in HyperparametersIn.model_fields}
        )
    text = TextClassifierConfig(
        steps=hp.text_steps,
        learning_rate=hp.text_learning_rate,
        weight_decay=hp.text_weight_decay,
        noise_std=hp.noise_std,
        label_smoothing=hp.label_smoothing,
        init=hp.text_init,
    )
    adapt = AdaptConfig(
        recipe=recipe,  # type: ignore[arg-type]  # AdaptConfig refuses an unknown recipe
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        prompt_tokens=hp.prompt_tokens,
        label_smoothing=hp.label_smoothing,
        max_steps=hp.max_steps,
        pseudo_label_balance=hp.pseudo_label_balance,
        balance_tau=hp.balance_tau,
    )
    return text, adapt


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
    recipe: Recipe = Field(
        default=_default(AdaptConfig, "recipe"),
        description="stage 2's recipe for every 'auto' hyperparameter: 'paper' is the reference "
        "(LaFTer's published defaults), 'default' the product's (scaled to the model, debiased "
        "pseudo-labels); see lafter/finetune.py",
    )
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    metadata: JsonObject = Field(default_factory=dict)
    webhook_url: Text | None = Field(
        default=None,
        description="http(s) URL that receives job.succeeded, job.failed or job.cancelled when the job "
        "ends, signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature) with "
        "your secret (POST /v1/webhook-secret first: 422 webhook_secret_missing otherwise). At most "
        "2000 characters, no credentials, and a host with public addresses only (422 "
        "webhook_url_invalid / webhook_url_forbidden); retried with backoff, redirects not followed",
    )


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
    recipe: str
    progress: Progress
    hyperparameters: dict[str, Any]
    seed: int
    error: JobError | None = None
    model_id: str | None = None
    metrics: dict[str, Any]
    warnings: list[dict[str, Any]]
    metadata: dict[str, Any]
    webhook_url: str | None = Field(description="where this job's final status is sent, if anywhere")
    webhook_deliveries: list[WebhookDelivery] = Field(
        default_factory=list,
        description="the webhook messages of this job (one once it has ended, if it has a webhook_url), "
        "each with its state and every attempt",
    )
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
    id: int = Field(
        description="the event's number within its job: 1, 2, 3... in the order the events were "
        "written; also the cursor (?after=)"
    )
    created_at: datetime
    kind: Literal["log", "metric"]
    level: str
    stage: str | None
    step: int | None
    message: str | None
    data: dict[str, Any]
