"""Dynamic batching of classify requests: one forward pass for the images of concurrent requests.

Requests decode their images in their own threads, then hand the ready ``uint8`` squares to the
process's ``Batcher``. One thread runs the forward passes: it takes whatever is waiting (up to
``max_batch`` images, after waiting at most ``window_s`` for more), groups it by classifier (an
adapted model's prompts and LayerNorms differ from another's, so only requests for the same model
share a forward) and answers each request's future with its rows. Alone, a request waits for
nothing: when no forward runs and none waits, it runs in the caller's own thread; under load, the requests that arrived
while one forward ran are batched into the next, so throughput approaches the batched encoder's and
a request waits at most for the forward in progress plus its own batch (plus the window).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lafter.predict import AdaptedClassifier

log = logging.getLogger(__name__)


@dataclass
class _Item:
    classifier: AdaptedClassifier
    images: torch.Tensor  # uint8 [N, 3, S, S]
    future: Future[torch.Tensor] = field(default_factory=Future)


class Batcher:
    def __init__(self, max_batch: int = 64, window_s: float = 0.0) -> None:
        self.max_batch = max(1, max_batch)
        self.window_s = max(0.0, window_s)
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held by whichever thread runs a forward
        self.forwards = 0  # forward passes run (for tests and metrics)
        self.batched_requests = 0  # requests answered by a forward shared with another request

    def submit(self, classifier: AdaptedClassifier, images: torch.Tensor) -> Future[torch.Tensor]:
        """Probabilities ``[N, C]`` for ``images`` (``uint8 [N, 3, S, S]``), as a future."""
        item = _Item(classifier, images)
        # Nothing running and nothing waiting: run it in the caller's thread (no hand-off, which on a
        # busy box costs more than a small model's forward). Otherwise it joins the next batch.
        if self._queue.empty() and self._busy.acquire(blocking=False):
            try:
                self._forward([item])
            finally:
                self._busy.release()
            return item.future
        self._ensure_thread()
        self._queue.put(item)
        return item.future

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="classify-batcher", daemon=True)
                self._thread.start()

    def _collect(self) -> list[_Item]:
        first = self._queue.get()
        items, count = [first], first.images.shape[0]
        deadline = time.monotonic() + self.window_s
        while count < self.max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            count += item.images.shape[0]
        return items

    def _run(self) -> None:
        while True:
            items = self._collect()
            groups: dict[int, list[_Item]] = {}
            for item in items:
                groups.setdefault(id(item.classifier), []).append(item)
            with self._busy:
                for group in groups.values():
                    self._forward(group)

    def _forward(self, group: list[_Item]) -> None:
        live = [item for item in group if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            batch = torch.cat([item.images for item in live]) if len(live) > 1 else live[0].images
            probs = live[0].classifier.predict_uint8(batch, batch_size=max(self.max_batch, batch.shape[0]))
        except BaseException as exc:  # every waiting request gets the error; the thread lives on
            log.exception("classify forward failed")
            for item in live:
                item.future.set_exception(exc)
            return
        self.forwards += 1
        if len(live) > 1:
            self.batched_requests += len(live)
        start = 0
        for item in live:
            n = item.images.shape[0]
            item.future.set_result(probs[start : start + n])
            start += n
