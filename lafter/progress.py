"""Progress reporting and cooperative cancellation shared by every stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lafter.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. ``metrics`` holds numbers (loss, images_per_s, ...) and small lists
    (the pseudo-label histogram); ``message`` is an optional log line."""

    stage: str
    step: int
    total: int
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


def no_progress(_event: ProgressEvent) -> None:
    return None


def never_cancel() -> bool:
    return False


def check_cancel(should_cancel: CancelCheck | None, stage: str, step: int) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"cancelled during {stage} after {step} steps", stage=stage, step=step)
