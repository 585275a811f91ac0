"""LaFTer (NeurIPS 2023): label-free adaptation of CLIP classifiers, as a library.

No web, database or task-queue imports: usable from a notebook or a script. See docs/design.md.
"""

from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone, list_base_models, load_backbone, parse_spec
from lafter.descriptions import DescriptionConfig, Descriptions, generate_descriptions
from lafter.errors import LafterError
from lafter.finetune import AdaptConfig, AdaptResult, adapt
from lafter.llm import LLMClient, LLMConfig
from lafter.pipeline import LafterRun, run_lafter
from lafter.predict import AdaptedClassifier, ZeroShotClassifier
from lafter.text_cache import EmbeddingCache, InMemoryEmbeddingCache, embed_sentences
from lafter.text_classifier import TextClassifierConfig, train_text_classifier
from lafter.views import ImageCache

__version__ = "0.1.0"

__all__ = [
    "AdaptConfig",
    "AdaptResult",
    "AdaptedClassifier",
    "AdaptedModel",
    "Backbone",
    "DescriptionConfig",
    "Descriptions",
    "EmbeddingCache",
    "ImageCache",
    "InMemoryEmbeddingCache",
    "LLMClient",
    "LLMConfig",
    "LafterError",
    "LafterRun",
    "TextClassifierConfig",
    "ZeroShotClassifier",
    "adapt",
    "embed_sentences",
    "generate_descriptions",
    "list_base_models",
    "load_backbone",
    "parse_spec",
    "run_lafter",
    "train_text_classifier",
]
