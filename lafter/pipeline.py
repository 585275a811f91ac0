"""LaFTer end to end: descriptions -> text embeddings -> text classifier -> unsupervised finetuning.

The CLI and the service's worker both go through here; the worker may also call the stages one by one
to record each stage's progress and cache its outputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.descriptions import DescriptionConfig, Descriptions, generate_descriptions
from lafter.finetune import AdaptConfig, AdaptResult, adapt
from lafter.guard import Evaluation, evaluate_candidates
from lafter.llm import DescriptionCache, LLMClient
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel
from lafter.text_cache import EmbeddingCache, embed_sentences
from lafter.text_classifier import TextClassifierConfig, TextClassifierResult, train_text_classifier
from lafter.views import ImageCache

STAGES = ("describing", "encoding_text", "training_text_classifier", "adapting", "evaluating")


@dataclass
class LafterRun:
    descriptions: Descriptions
    text: TextClassifierResult
    adaptation: AdaptResult
    seconds: dict[str, float] = field(default_factory=dict)
    zero_shot: AdaptedModel | None = None
    guard: Evaluation | None = None  # None when run with evaluate=False

    @property
    def model(self) -> AdaptedModel:
        """The adapted model (whether or not it is the one to serve: see ``served_model``)."""
        return self.adaptation.model

    @property
    def text_model(self) -> AdaptedModel:
        return AdaptedModel.from_text_head(self.model.base_spec, self.model.class_names, self.text.head)

    @property
    def served_kind(self) -> str:
        """Which of "lafter", "text_classifier", "zero_shot" the evaluation chose to serve."""
        return self.guard.served if self.guard is not None else "lafter"

    @property
    def served_model(self) -> AdaptedModel:
        kind = self.served_kind
        if kind == "text_classifier":
            return self.text_model
        if kind == "zero_shot":
            assert self.zero_shot is not None
            return self.zero_shot
        return self.model

    @property
    def evaluation(self) -> dict[str, Any]:
        return self.guard.report if self.guard is not None else {}

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return list(self.descriptions_warnings()) + (self.guard.warnings if self.guard is not None else [])

    def descriptions_warnings(self) -> list[dict[str, Any]]:
        return [{"code": "descriptions", "message": w} for w in self.descriptions.warnings]

    def hyperparameters(self) -> dict[str, Any]:
        return {"text_classifier": self.text.resolved, "adapt": self.adaptation.resolved}


def encode_descriptions(
    backbone: Backbone,
    descriptions: Descriptions,
    cache: EmbeddingCache | None = None,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    emb = embed_sentences(backbone, descriptions.sentences, cache)
    if progress is not None:
        progress(ProgressEvent("encoding_text", 1, 1, {"sentences": len(descriptions.sentences)}))
    return emb


def run_lafter(
    backbone: Backbone,
    class_names: Sequence[str],
    images: ImageCache | Sequence[Image.Image],
    *,
    descriptions: DescriptionConfig | None = None,
    llm: LLMClient | None = None,
    description_cache: DescriptionCache | None = None,
    embedding_cache: EmbeddingCache | None = None,
    text_config: TextClassifierConfig | None = None,
    adapt_config: AdaptConfig | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    evaluate: bool = True,
    eval_images: ImageCache | None = None,
    eval_labels: Sequence[int] | None = None,
) -> LafterRun:
    """Stages 0-2, then (``evaluate``) the choice of the classifier to serve: zero-shot, the text
    classifier or the adapted model, by accuracy on ``eval_images``/``eval_labels`` when given (never
    trained on), else by the label-free guard (``lafter.guard``)."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    desc = generate_descriptions(
        list(class_names),
        descriptions,
        llm=llm,
        cache=description_cache,
        progress=progress,
        should_cancel=should_cancel,
    )
    seconds["describing"] = time.perf_counter() - t
    check_cancel(should_cancel, "encoding_text", 0)
    t = time.perf_counter()
    emb = encode_descriptions(backbone, desc, embedding_cache, progress)
    seconds["encoding_text"] = time.perf_counter() - t
    t = time.perf_counter()
    text = train_text_classifier(
        emb,
        desc.labels,
        len(desc.class_names),
        text_config,
        seed=seed,
        device=backbone.device,
        progress=progress,
        should_cancel=should_cancel,
    )
    seconds["training_text_classifier"] = time.perf_counter() - t
    t = time.perf_counter()
    adaptation = adapt(
        backbone,
        text.head,
        images,
        desc.class_names,
        adapt_config,
        seed=seed,
        progress=progress,
        should_cancel=should_cancel,
    )
    seconds["adapting"] = time.perf_counter() - t
    adaptation.model.metadata.update(
        {
            "descriptions_source": desc.source_used,
            "sentences": len(desc.sentences),
            "text_classifier": {k: v for k, v in text.resolved.items() if isinstance(v, int | float | str)},
        }
    )
    run = LafterRun(descriptions=desc, text=text, adaptation=adaptation, seconds=seconds)
    if evaluate:
        check_cancel(should_cancel, "evaluating", 0)
        t = time.perf_counter()
        cache = (
            images
            if isinstance(images, ImageCache)
            else ImageCache.from_pil(list(images), backbone.image_size)
        )
        run.zero_shot = AdaptedModel.zero_shot(backbone, list(desc.class_names))
        run.guard = evaluate_candidates(
            backbone,
            {"zero_shot": run.zero_shot, "text_classifier": run.text_model, "lafter": run.model},
            cache,
            eval_images,
            eval_labels,
        )
        seconds["evaluating"] = time.perf_counter() - t
        if progress is not None:
            progress(ProgressEvent("evaluating", 1, 1, {"served": run.guard.served}))
    return run
