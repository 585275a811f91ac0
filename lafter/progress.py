"""Progress reporting and cooperative cancellation shared by every stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lafter.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``metrics`` holds numbers (loss, images_per_s, ...) and small lists
    (the pseudo-label histogram); ``message`` is an optional log line at ``level`` ("info",
    "warning"). ``starts_stage`` marks the first event of a stage (step 0 of an unknown total)."""

    stage: str
    step: int
    total: int
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    level: str = "info"
    starts_stage: bool = False

    @classmethod
    def stage_started(cls, stage: str, message: str | None = None) -> ProgressEvent:
        return cls(stage, 0, 0, message=message or f"stage {stage} started", starts_stage=True)


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


def check_cancel(should_cancel: CancelCheck | None, stage: str, step: int) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"cancelled during {stage} after {step} steps", stage=stage, step=step)
