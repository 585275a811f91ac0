"""Loading base models the same way in the API and the worker."""

from __future__ import annotations

import torch

from app.core.settings import Settings
from lafter.backbone import Backbone, load_backbone, parse_spec

RANDOM_WEIGHTS_SEED = 0


def load_base(spec: str, settings: Settings, *, device: str) -> Backbone:
    cache_dir = str(settings.model_cache_dir) if settings.model_cache_dir else None
    if parse_spec(spec).is_random:
        # Random weights must be the same in every process: the worker trains a delta on them, the
        # API applies it, and text embeddings are cached by spec.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return load_backbone(spec, device=device, precision=settings.precision, cache_dir=cache_dir)
    return load_backbone(spec, device=device, precision=settings.precision, cache_dir=cache_dir)
