"""LaFTer (NeurIPS 2023): label-free adaptation of CLIP classifiers, as a library.

No web, database or task-queue imports: usable from a notebook or a script. See docs/design.md.
The names below are imported on first use, so ``import lafter.llm`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptConfig": "lafter.finetune",
    "AdaptResult": "lafter.finetune",
    "adapt": "lafter.finetune",
    "AdaptedClassifier": "lafter.predict",
    "ZeroShotClassifier": "lafter.predict",
    "AdaptedModel": "lafter.artifact",
    "Backbone": "lafter.backbone",
    "list_base_models": "lafter.backbone",
    "load_backbone": "lafter.backbone",
    "parse_spec": "lafter.backbone",
    "DescriptionConfig": "lafter.descriptions",
    "Descriptions": "lafter.descriptions",
    "generate_descriptions": "lafter.descriptions",
    "EmbeddingCache": "lafter.text_cache",
    "InMemoryEmbeddingCache": "lafter.text_cache",
    "embed_sentences": "lafter.text_cache",
    "ImageCache": "lafter.views",
    "LLMClient": "lafter.llm",
    "LLMConfig": "lafter.llm",
    "LafterError": "lafter.errors",
    "LafterRun": "lafter.pipeline",
    "run_lafter": "lafter.pipeline",
    "TextClassifierConfig": "lafter.text_classifier",
    "train_text_classifier": "lafter.text_classifier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lafter' has no attribute {name!r}")
