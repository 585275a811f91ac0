"""``Client``: the entry point, in the style of the openai SDK."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import httpx

from lafter_client._transport import Transport
from lafter_client.resources import Datasets, ImageInput, Jobs, Models, classify_in_batches
from lafter_client.types import Classification

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


class Client:
    """A client of one LaFTer service.

    ``base_url`` defaults to ``LAFTER_BASE_URL`` (else ``http://127.0.0.1:8000``, where
    ``scripts/serve`` listens), ``api_key`` to ``LAFTER_API_KEY`` (none: for a service running with
    auth off). Failed calls are retried ``max_retries`` times with exponential backoff and jitter
    when that is safe (see ``lafter_client._transport``)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url or os.environ.get("LAFTER_BASE_URL") or DEFAULT_BASE_URL
        self.api_key = api_key if api_key is not None else os.environ.get("LAFTER_API_KEY") or None
        self._transport = Transport(
            self.base_url,
            self.api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            http_client=http_client,
        )
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)

    def classify_zero_shot(
        self, base_model: str, class_names: Sequence[str], images: Sequence[ImageInput], *, top_k: int = 5
    ) -> Classification:
        """Zero-shot CLIP from class names: the baseline an adapted model is compared with."""
        form = {"base_model": base_model, "class_names": json.dumps(list(class_names)), "top_k": str(top_k)}
        return classify_in_batches(self, "/v1/classify", images, form)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
