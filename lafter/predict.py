"""Prediction: one interface for zero-shot CLIP, the stage-1 text classifier and adapted models.

Every classifier is a base model plus an ``AdaptedModel`` delta; the base is never modified, so one
loaded backbone serves any number of classifiers (the service keeps deltas in an LRU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.prompted import PromptedTower
from lafter.views import ImageCache, ImageSource, ViewMaker


class AdaptedClassifier:
    def __init__(self, backbone: Backbone, adapted: AdaptedModel, strict_spec: bool = True) -> None:
        adapted.check_compatible(backbone, strict_spec=strict_spec)
        self.backbone = backbone
        self.adapted = adapted
        self.class_names = list(adapted.class_names)
        dev = backbone.device
        self.tower = PromptedTower(backbone.visual)
        self.prompts = adapted.prompts.to(dev) if adapted.prompts is not None else None
        self.ln = {k: v.to(dev) for k, v in adapted.layernorms.items()}
        self.head = adapted.head_weight.to(dev).float()
        self.views = ViewMaker(backbone.image_size, backbone.mean, backbone.std).to(dev)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised float batch ``[N, 3, H, W]`` (already on any device)."""
        x = x.to(self.backbone.device)
        with self.backbone.autocast():
            feats = self.tower(x, self.prompts, self.ln).float()
        if self.adapted.normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats @ self.head.t()

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(dim=-1).cpu()

    @torch.no_grad()
    def predict_uint8(self, u8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Probabilities for a uint8 cache batch (the eval transform already applied by the cache)."""
        out = []
        for start in range(0, u8.shape[0], batch_size):
            chunk = u8[start : start + batch_size].to(self.backbone.device, non_blocking=True)
            out.append(self.predict_tensor(self.views.weak(chunk)))
        return torch.cat(out) if out else torch.zeros(0, len(self.class_names))

    def predict_images(self, images: Sequence[ImageSource], batch_size: int = 64) -> torch.Tensor:
        cache = ImageCache.from_sources(list(images), self.backbone.image_size)
        return self.predict_uint8(cache.data, batch_size=batch_size)

    def top_k(self, images: Sequence[ImageSource], k: int = 5) -> list[list[tuple[str, float]]]:
        probs = self.predict_images(images)
        return top_k_labels(probs, self.class_names, k)


def top_k_labels(probs: torch.Tensor, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    k = max(1, min(k, len(class_names)))
    scores, idx = probs.topk(k, dim=-1)
    return [
        [(class_names[int(i)], float(s)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores, idx, strict=True)
    ]


class ZeroShotClassifier(AdaptedClassifier):
    """CLIP zero-shot from class names: the baseline, through the same interface."""

    def __init__(
        self, backbone: Backbone, class_names: Sequence[str], templates: list[str] | None = None
    ) -> None:
        super().__init__(backbone, AdaptedModel.zero_shot(backbone, list(class_names), templates))


Classifier = AdaptedClassifier
