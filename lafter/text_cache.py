"""Text embeddings with a cache keyed by (model, sentence).

The reference keys its cache by dataset name, so a change of model or sentences silently reuses stale
vectors. Here the key is what the vector depends on: the model spec and the exact sentence.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from lafter.backbone import Backbone


class EmbeddingCache(Protocol):
    def get_many(self, model_key: str, sentences: list[str]) -> dict[str, torch.Tensor]:
        """The cached vectors among ``sentences`` (missing ones are simply absent)."""
        ...

    def put_many(self, model_key: str, items: dict[str, torch.Tensor]) -> None: ...


class InMemoryEmbeddingCache:
    """A bounded LRU in process memory. Counts hits and misses so callers can prove reuse."""

    def __init__(self, max_items: int = 1_000_000) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get_many(self, model_key: str, sentences: list[str]) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for s in sentences:
            key = (model_key, s)
            if key in self._items:
                self._items.move_to_end(key)
                found[s] = self._items[key]
        self.hits += len(found)
        self.misses += len(set(sentences)) - len(found)
        return found

    def put_many(self, model_key: str, items: dict[str, torch.Tensor]) -> None:
        for s, v in items.items():
            self._items[(model_key, s)] = v.detach().float().cpu()
            self._items.move_to_end((model_key, s))
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


def embed_sentences(
    backbone: Backbone, sentences: list[str], cache: EmbeddingCache | None = None, batch_size: int = 256
) -> torch.Tensor:
    """``[N, D]`` float32 L2-normalised embeddings on the CPU, in the order given. Only sentences the
    cache lacks are encoded; each distinct sentence is encoded once."""
    if not sentences:
        return torch.zeros(0, backbone.embed_dim)
    unique = list(dict.fromkeys(sentences))
    known = cache.get_many(backbone.spec, unique) if cache is not None else {}
    missing = [s for s in unique if s not in known]
    if missing:
        fresh = backbone.encode_text(missing, batch_size=batch_size)
        new = {s: fresh[i] for i, s in enumerate(missing)}
        if cache is not None:
            cache.put_many(backbone.spec, new)
        known = {**known, **new}
    return torch.stack([known[s].float() for s in sentences])
