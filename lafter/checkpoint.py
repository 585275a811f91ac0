"""The one checkpoint format: a stage-2 run's state (``AdaptCheckpoint``) and, for a whole run, the
stage-1 head it started from (stage 2's frozen teacher: a resumed run must use that very head).

Written by ``torch.save`` of plain containers, read back with ``weights_only=True``. ``inputs`` is
the caller's digest of what the run was made from (images, settings): the library stores it and
hands it back, and a caller compares it before resuming."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lafter.errors import InvalidInputError
from lafter.finetune import AdaptCheckpoint
from lafter.text_classifier import TextClassifierResult

FORMAT = 1


@dataclass
class RunCheckpoint:
    adapt: AdaptCheckpoint
    text: TextClassifierResult | None = None
    inputs: str = ""

    @property
    def step(self) -> int:
        return self.adapt.step

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {"format": FORMAT, "inputs": self.inputs, "adapt": self.adapt.to_dict()}
        if self.text is not None:
            data["text"] = {
                "head": self.text.head.weight.detach().cpu().clone(),
                "steps": self.text.steps,
                "final_loss": self.text.final_loss,
                "train_accuracy": self.text.train_accuracy,
            }
        buf = io.BytesIO()
        torch.save(data, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RunCheckpoint:
        """Raises ``InvalidInputError`` for anything that is not a checkpoint of this format."""
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInputError(f"not a stage-2 checkpoint: {exc}") from exc
        if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
            raise InvalidInputError(f"not a stage-2 checkpoint of format {FORMAT}")
        text = None
        if "text" in loaded:
            try:
                text = _text_result(loaded["text"])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise InvalidInputError(f"not a stage-2 checkpoint: {exc}") from exc
        adapt = AdaptCheckpoint.from_dict(loaded.get("adapt") or {})
        return cls(adapt=adapt, text=text, inputs=str(loaded.get("inputs") or ""))


def _text_result(saved: dict[str, Any]) -> TextClassifierResult:
    weight = saved["head"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return TextClassifierResult(
        head=head,
        steps=int(saved["steps"]),
        final_loss=float(saved["final_loss"]),
        train_accuracy=float(saved["train_accuracy"]),
        seconds=0.0,
        resolved={"restored_from_checkpoint": True},
    )
