"""Models in memory in the API process: each base model is loaded once (bounded), adapted deltas
live in an LRU keyed by (model id, checksum), so many adapted models share one base. This is a
cache that says so: its state is per process and safe to lose."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Generic, TypeVar

from app.core.backbones import load_base
from app.core.metrics import MODEL_LOADS
from app.core.settings import Settings, get_settings
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.predict import AdaptedClassifier, ZeroShotClassifier

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe LRU whose ``get_or_load`` loads each key once even under concurrent misses."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._key_locks.pop(key, None)
            return value

    def discard(self, predicate: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)


class ModelRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bases: LRU[str, Backbone] = LRU(settings.base_model_cache_size)
        self.adapted: LRU[tuple[str, str], AdaptedClassifier] = LRU(settings.adapted_cache_size)
        self.zero_shot: LRU[tuple[str, tuple[str, ...]], ZeroShotClassifier] = LRU(
            settings.adapted_cache_size
        )

    def backbone(self, spec: str) -> Backbone:
        def load() -> Backbone:
            MODEL_LOADS.labels("base").inc()
            log.info("loading base model %s for classification", spec)
            return load_base(spec, self.settings, device=self.settings.api_device)

        return self.bases.get_or_load(spec, load)

    def adapted_classifier(
        self, model_id: str, checksum: str, read: Callable[[], bytes]
    ) -> AdaptedClassifier:
        def load() -> AdaptedClassifier:
            MODEL_LOADS.labels("delta").inc()
            artifact = AdaptedModel.from_bytes(read())
            return AdaptedClassifier(self.backbone(artifact.base_spec), artifact)

        return self.adapted.get_or_load((model_id, checksum), load)

    def zero_shot_classifier(self, spec: str, class_names: list[str]) -> ZeroShotClassifier:
        key = (spec, tuple(class_names))
        return self.zero_shot.get_or_load(key, lambda: ZeroShotClassifier(self.backbone(spec), class_names))

    def forget(self, model_id: str) -> None:
        self.adapted.discard(lambda key: key[0] == model_id)


@lru_cache(maxsize=1)
def get_runtime() -> ModelRuntime:
    return ModelRuntime(get_settings())
