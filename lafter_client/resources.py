"""``client.datasets``, ``client.jobs`` and ``client.models``: one method per API operation."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel

from lafter_client import upload as packing
from lafter_client.errors import (
    ConnectionError,
    PayloadTooLargeError,
    ServerError,
    StreamError,
    TimeoutError,
    ValidationError,
)
from lafter_client.sse import iter_sse
from lafter_client.types import (
    AcceptedFile,
    Classification,
    Dataset,
    DuplicateFile,
    Job,
    JobEvent,
    Model,
    Page,
    RejectedFile,
    UploadReport,
)

if TYPE_CHECKING:
    from lafter_client.client import Client

M = TypeVar("M", bound=BaseModel)
ImageInput = str | os.PathLike[str] | bytes | tuple[str, bytes]
# Codes of a refused upload request that may pass when its files are sent in smaller requests.
_SPLITTABLE = frozenset({"request_too_large", "too_many_files"})
CLASSIFY_BATCH = 256  # the service's default LAFTER_CLASSIFY_MAX_IMAGES


def _paged(client: Client, path: str, model: type[M], params: dict[str, Any]) -> Iterator[M]:
    """Every item of a cursor-paginated list, fetching pages as the iteration needs them."""
    params = {k: v for k, v in params.items() if v is not None}
    while True:
        body = client._transport.request("GET", path, params=params).json()
        page = Page[model].model_validate(body)  # type: ignore[valid-type]
        yield from page.data
        if not page.has_more or not page.next_cursor:
            return
        params = {**params, "after": page.next_cursor}


def _image_parts(images: Sequence[ImageInput]) -> list[tuple[str, bytes]]:
    parts = []
    for i, image in enumerate(images):
        if isinstance(image, bytes):
            parts.append((f"image-{i}", image))
        elif isinstance(image, tuple):
            parts.append((image[0], image[1]))
        else:
            path = Path(image)
            parts.append((path.name, path.read_bytes()))
    return parts


def classify_in_batches(
    client: Client, path: str, images: Sequence[ImageInput], form: dict[str, str]
) -> Classification:
    """Images in requests of at most ``CLASSIFY_BATCH``, answered as one classification."""
    parts = _image_parts(images)
    if not parts:
        raise ValueError("no images to classify")
    merged: Classification | None = None
    for start in range(0, len(parts), CLASSIFY_BATCH):
        batch = parts[start : start + CLASSIFY_BATCH]
        response = client._transport.request(
            "POST",
            path,
            data=form,
            files=lambda batch=batch: [("files", (name, data)) for name, data in batch],  # type: ignore[misc]
            safe_to_repeat=True,  # classifying changes nothing
        )
        result = Classification.model_validate(response.json())
        for item in result.data:
            item.index += start
        if merged is None:
            merged = result
        else:
            merged.data.extend(result.data)
    assert merged is not None
    return merged


class Datasets:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, name: str, metadata: Mapping[str, Any] | None = None) -> Dataset:
        body = {"name": name, "metadata": dict(metadata or {})}
        return Dataset.model_validate(
            self._client._transport.request("POST", "/v1/datasets", json=body).json()
        )

    def list(self, *, limit: int | None = None) -> Iterator[Dataset]:
        return _paged(self._client, "/v1/datasets", Dataset, {"limit": limit})

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate(
            self._client._transport.request("GET", f"/v1/datasets/{dataset_id}").json()
        )

    def delete(self, dataset_id: str) -> None:
        self._client._transport.request("DELETE", f"/v1/datasets/{dataset_id}")

    def upload(
        self,
        dataset_id: str,
        folder_or_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        split: str | None = None,
        labels: Mapping[str, str] | None = None,
        *,
        progress: bool = True,
        chunk_bytes: int = packing.DEFAULT_CHUNK_BYTES,
        chunk_files: int = packing.DEFAULT_CHUNK_FILES,
    ) -> UploadReport:
        """Upload a folder (walked for images) and/or files, in tar archives of at most
        ``chunk_bytes`` and ``chunk_files``. ``split="eval"`` makes a labelled evaluation split:
        each image's class is its parent folder's name, or ``labels[relative path or file name]``.
        A request the server finds too large is split in two and sent again. Returns every file's
        outcome; ``progress`` draws a bar on stderr."""
        files = packing.collect(folder_or_files)
        if not files:
            raise ValueError(f"no image files found in {folder_or_files}")
        report = UploadReport(dataset_id=dataset_id)
        bar = packing.ProgressBar(len(files), sum(f.size for f in files), enabled=progress)
        try:
            pending = list(packing.chunks(files, chunk_bytes, chunk_files))
            while pending:
                chunk = pending.pop(0)
                try:
                    self._send(dataset_id, chunk, split, labels, report)
                except (PayloadTooLargeError, ValidationError) as exc:
                    if exc.code not in _SPLITTABLE or len(chunk.files) < 2:
                        raise
                    half = len(chunk.files) // 2
                    pending[:0] = [packing.Chunk(chunk.files[:half]), packing.Chunk(chunk.files[half:])]
                    continue
                bar.advance(len(chunk.files), chunk.size)
        finally:
            bar.close()
        return report

    def _send(
        self,
        dataset_id: str,
        chunk: packing.Chunk,
        split: str | None,
        labels: Mapping[str, str] | None,
        report: UploadReport,
    ) -> None:
        form: dict[str, str] = {}
        if split:
            form["split"] = split
        if labels:
            names = {f.name for f in chunk.files} | {Path(f.name).name for f in chunk.files}
            mine = {k: v for k, v in labels.items() if k in names}
            if mine:
                form["labels"] = json.dumps(mine)
        # A caller's own archive goes as it is; images always go packed, so that a member's folder
        # can name its class (split="eval") and its path comes back as the caller wrote it.
        single = len(chunk.files) == 1 and packing.is_archive(chunk.files[0].name)
        archive_name = f"lafter-upload-{uuid.uuid4().hex[:8]}.tar"
        packed = None if single else packing.pack(chunk)

        def parts() -> list[tuple[str, tuple[str, Any]]]:
            if packed is None:
                f = chunk.files[0]
                return [("files", (f.name, f.path.read_bytes()))]
            packed.seek(0)  # a retry sends the archive again from its start
            return [("files", (archive_name, packed))]

        # Same bytes, same SHA-256: a repeated upload stores nothing twice, so retries are safe.
        try:
            response = self._client._transport.request(
                "POST",
                f"/v1/datasets/{dataset_id}/images",
                data=form or None,
                files=parts,
                safe_to_repeat=True,
                timeout=httpx.Timeout(60.0, read=600.0),
            )
        except (PayloadTooLargeError, ValidationError) as exc:
            splittable = exc.code in _SPLITTABLE and len(chunk.files) > 1
            if splittable or "rejected" not in exc.body:
                raise
            # Nothing of this request was accepted: the answer still says why for each file.
            body = {"rejected": exc.body["rejected"]}
        else:
            body = response.json()
        finally:
            if packed is not None:
                packed.close()
        self._merge(report, body, None if single else archive_name)
        report.requests += 1

    @staticmethod
    def _merge(report: UploadReport, body: dict[str, Any], archive: str | None = None) -> None:
        def own(name: str) -> str:
            # The service names an archive member "<archive>/<path>": give back the caller's path.
            return name.removeprefix(f"{archive}/") if archive else name

        for item in body.get("accepted", []):
            report.accepted.append(AcceptedFile.model_validate({**item, "filename": own(item["filename"])}))
        for item in body.get("duplicates", []):
            report.duplicates.append(
                DuplicateFile.model_validate({**item, "filename": own(item["filename"])})
            )
        for item in body.get("rejected", []):
            report.rejected.append(RejectedFile.model_validate({**item, "filename": own(item["filename"])}))
        if body.get("dataset"):
            report.dataset = Dataset.model_validate(body["dataset"])


class Jobs:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        dataset_id: str,
        class_names: Sequence[str],
        *,
        base_model: str | None = None,
        descriptions: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        recipe: str | None = None,
        seed: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job (the service's defaults for whatever is left out). One ``Idempotency-Key``
        is sent on every try of this call, so a retry after a lost answer starts no second job."""
        body: dict[str, Any] = {"dataset_id": dataset_id, "class_names": list(class_names)}
        for key, value in (
            ("base_model", base_model),
            ("descriptions", descriptions),
            ("hyperparameters", hyperparameters),
            ("recipe", recipe),
            ("seed", seed),
            ("metadata", metadata),
            ("webhook_url", webhook_url),
        ):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        key = idempotency_key or f"lafter-client-{uuid.uuid4()}"
        response = self._client._transport.request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, safe_to_repeat=True
        )
        return Job.model_validate(response.json())

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._client._transport.request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, *, status: str | None = None, limit: int | None = None) -> Iterator[Job]:
        return _paged(self._client, "/v1/jobs", Job, {"status": status, "limit": limit})

    def cancel(self, job_id: str) -> Job:
        response = self._client._transport.request("POST", f"/v1/jobs/{job_id}/cancel", safe_to_repeat=True)
        return Job.model_validate(response.json())

    def list_events(self, job_id: str, *, after: int | None = None) -> Iterator[JobEvent]:
        """The events written so far (JSON pages), after event ``after``."""
        params: dict[str, Any] = {"limit": 1000}
        while True:
            if after is not None:
                params["after"] = after
            body = self._client._transport.request("GET", f"/v1/jobs/{job_id}/events", params=params).json()
            page = Page[JobEvent].model_validate(body)
            yield from page.data
            if page.data:
                after = page.data[-1].id
            if not page.has_more:
                return

    def _stream(self, job_id: str, after: int | None, read_timeout: float) -> Iterator[JobEvent | Job]:
        """Events from the SSE stream, then the final job (``done``); raises ``StreamError`` when
        the stream ends without it."""
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        timeout = httpx.Timeout(30.0, read=read_timeout)
        with self._client._transport.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
        ) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise StreamError("the service answered without an event stream", code="stream_unsupported")
            for message in iter_sse(response.iter_lines()):
                if message.comment is not None:
                    continue
                if message.event == "done":
                    yield Job.model_validate(message.json())
                    return
                if message.event == "error":
                    body = message.json()
                    raise StreamError(body.get("detail", "stream error"), code=body.get("code"), body=body)
                yield JobEvent.model_validate(message.json())
        raise StreamError("the event stream ended before the job was final", code="stream_broken")

    def events(self, job_id: str, *, after: int | None = None, reconnect: int = 5) -> Iterator[JobEvent]:
        """The job's events as they happen (Server-Sent Events), from after event ``after``; ends
        when the job is final. A dropped stream is resumed after the last event received
        (``Last-Event-ID``), up to ``reconnect`` times in a row."""
        failures = 0
        while True:
            try:
                for item in self._stream(job_id, after, read_timeout=120.0):
                    if isinstance(item, Job):
                        return
                    failures = 0
                    after = item.id
                    yield item
                return
            except (StreamError, ConnectionError, httpx.TransportError) as exc:
                if isinstance(exc, StreamError) and exc.code != "stream_broken":
                    raise
                failures += 1
                if failures > reconnect:
                    raise
                time.sleep(min(2.0 * failures, 10.0))

    def wait(
        self,
        job_id: str,
        on_event: Callable[[JobEvent], None] | None = None,
        timeout: float | None = None,
        *,
        poll_interval: float = 2.0,
    ) -> Job:
        """Block until the job is final and return it. Progress comes over the event stream, each
        event handed to ``on_event``; if the stream breaks, the job is polled instead (and the
        events it missed are still handed over, in order). Raises ``lafter_client.TimeoutError``
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            if deadline is None:
                return 120.0
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} was not final after {timeout} s", code="wait_timeout")
            return remaining

        last: int | None = None
        try:
            for item in self._stream(job_id, last, read_timeout=min(120.0, left())):
                if isinstance(item, Job):
                    return item
                last = item.id
                if on_event is not None:
                    on_event(item)
                left()
        except (StreamError, ConnectionError, ServerError, httpx.TransportError) as exc:
            if isinstance(exc, StreamError) and exc.code not in ("stream_broken", "stream_unsupported"):
                raise
        # The stream broke: poll, handing over the events it did not deliver.
        while True:
            left()
            try:
                job = self.get(job_id)
                for event in self.list_events(job_id, after=last):
                    last = event.id
                    if on_event is not None:
                        on_event(event)
            except (ConnectionError, ServerError):
                job = None
            if job is not None and job.is_final:
                return job
            time.sleep(min(poll_interval, max(0.0, left())))


class Models:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, limit: int | None = None) -> Iterator[Model]:
        return _paged(self._client, "/v1/models", Model, {"limit": limit})

    def get(self, model_id: str) -> Model:
        return Model.model_validate(self._client._transport.request("GET", f"/v1/models/{model_id}").json())

    def delete(self, model_id: str) -> None:
        self._client._transport.request("DELETE", f"/v1/models/{model_id}")

    def classify(self, model_id: str, images: Sequence[ImageInput], *, top_k: int = 5) -> Classification:
        """Classify images (paths, bytes, or (name, bytes)) with an adapted model."""
        return classify_in_batches(
            self._client, f"/v1/models/{model_id}/classify", images, {"top_k": str(top_k)}
        )
