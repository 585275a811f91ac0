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
from lafter.llm import DescriptionCache, LLMClient
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel
from lafter.text_cache import EmbeddingCache, embed_sentences
from lafter.text_classifier import TextClassifierConfig, TextClassifierResult, train_text_classifier
from lafter.views import ImageCache

STAGES = ("describing", "encoding_text", "training_text_classifier", "adapting")


@dataclass
class LafterRun:
    descriptions: Descriptions
    text: TextClassifierResult
    adaptation: AdaptResult
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> AdaptedModel:
        return self.adaptation.model

    @property
    def text_model(self) -> AdaptedModel:
        return AdaptedModel.from_text_head(self.model.base_spec, self.model.class_names, self.text.head)

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
) -> LafterRun:
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
    return LafterRun(descriptions=desc, text=text, adaptation=adaptation, seconds=seconds)
