"""Models in memory in the API process: each base model is loaded once (bounded), adapted deltas
live in an LRU keyed by (model id, checksum), so many adapted models share one base. This is a
cache that says so: its state is per process and safe to lose."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from app.base_models.service import allowed
from app.core.backbones import load_base
from app.core.lru import LRU
from app.core.metrics import MODEL_LOADS
from app.core.settings import Settings, get_settings
from app.models.batching import Batcher
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.errors import LafterError
from lafter.predict import AdaptedClassifier, ZeroShotClassifier

log = logging.getLogger(__name__)
_MAX_FAILURES = 256


@dataclass(frozen=True)
class ModelRow:
    """What a classify needs from a model's database row; rows never change once written."""

    id: str
    owner_id: str
    checksum: str
    kind: str
    base_model: str
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class _Failure:
    at: float  # time.monotonic() of the failed load
    error: LafterError


class ModelRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bases: LRU[str, Backbone] = LRU(settings.base_model_cache_size)
        self.adapted: LRU[tuple[str, str], AdaptedClassifier] = LRU(settings.adapted_cache_size)
        self.zero_shot: LRU[tuple[str, tuple[str, ...]], ZeroShotClassifier] = LRU(
            settings.adapted_cache_size
        )
        # (owner id, model id) -> (time.monotonic() it was read, row): keyed by the owner too, so a
        # row cached for one owner never answers another's request.
        self._rows: OrderedDict[tuple[str, str], tuple[float, ModelRow]] = OrderedDict()
        self._rows_lock = threading.Lock()
        self.batcher = Batcher(settings.classify_batch_size, settings.classify_batch_window_ms / 1000)
        # Specs whose load failed, not tried again for LAFTER_BASE_MODEL_RETRY_AFTER_S: a spec that
        # cannot load costs one load per period, however many requests name it. Bounded.
        self._failures: OrderedDict[str, _Failure] = OrderedDict()
        self._failures_lock = threading.Lock()

    def _remembered(self, spec: str) -> None:
        """Raise the failure of a recent load of ``spec``, saying when it will be tried again."""
        with self._failures_lock:
            failure = self._failures.get(spec)
            if failure is None:
                return
            age = time.monotonic() - failure.at
            wait = self.settings.base_model_retry_after_s - age
            if wait <= 0:
                del self._failures[spec]
                return
        raise LafterError(
            f"{failure.error.message} (this load failed {age:.0f} s ago; it is retried after "
            f"{wait:.0f} s more)",
            code=failure.error.code,
        )

    def _remember(self, spec: str, error: LafterError) -> None:
        if self.settings.base_model_retry_after_s <= 0:
            return
        with self._failures_lock:
            self._failures[spec] = _Failure(time.monotonic(), error)
            self._failures.move_to_end(spec)
            while len(self._failures) > _MAX_FAILURES:
                self._failures.popitem(last=False)

    def backbone(self, spec: str) -> Backbone:
        """The loaded base model of ``spec``: only a spec this deployment allows, loaded at most once
        at a time (callers that ask while it loads wait for that load), and a spec whose load failed
        recently fails at once with the same error."""
        allowed(spec, self.settings)
        self._remembered(spec)

        def load() -> Backbone:
            self._remembered(spec)  # it may have failed while this caller waited for the lock
            MODEL_LOADS.labels("base").inc()
            log.info("loading base model %s for classification", spec)
            try:
                return load_base(spec, self.settings, device=self.settings.api_device)
            except LafterError as exc:
                log.warning("base model %s failed to load: %s", spec, exc)
                self._remember(spec, exc)
                raise

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

    def model_row(self, owner_id: str, model_id: str, read: Callable[[], ModelRow]) -> ModelRow:
        """The model's row, read through ``read`` at most once per LAFTER_CLASSIFY_MODEL_ROW_TTL_S
        (the hot path's only database query otherwise); ``read`` raises for an unknown model, and
        nothing is cached then."""
        ttl = self.settings.classify_model_row_ttl_s
        key = (owner_id, model_id)
        now = time.monotonic()
        with self._rows_lock:
            hit = self._rows.get(key)
            if hit is not None and now - hit[0] < ttl:
                return hit[1]
        row = read()
        if ttl > 0:
            with self._rows_lock:
                self._rows[key] = (now, row)
                self._rows.move_to_end(key)
                while len(self._rows) > 4 * self.settings.adapted_cache_size:
                    self._rows.popitem(last=False)
        return row

    def forget(self, model_id: str) -> None:
        self.adapted.discard(lambda key: key[0] == model_id)
        with self._rows_lock:
            for key in [k for k in self._rows if k[1] == model_id]:
                del self._rows[key]


@lru_cache(maxsize=1)
def get_runtime() -> ModelRuntime:
    return ModelRuntime(get_settings())
