"""The classify batcher: concurrent requests share forwards, each gets exactly its own rows, a failed
forward fails only its requests, and a lone request runs in its caller's thread."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.datasets.images import Candidate, Limits, Rejection, decode_for_prediction, decode_image
from app.models.batching import Batcher
from lafter.artifact import PROMPTS, AdaptedModel
from lafter.backbone import load_backbone
from lafter.predict import AdaptedClassifier, ZeroShotClassifier
from lafter.views import to_square_uint8

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"


@pytest.fixture(scope="module")
def classifiers() -> tuple[ZeroShotClassifier, AdaptedClassifier]:
    backbone = load_backbone(TINY, device="cpu")
    zs = ZeroShotClassifier(backbone, ["red", "green", "blue"])
    torch.manual_seed(1)
    delta = AdaptedModel.zero_shot(backbone, ["red", "green", "blue"])
    delta.tensors[PROMPTS] = torch.randn(4, backbone.width) * 0.02  # another model, same base
    return zs, AdaptedClassifier(backbone, delta)


def _batch(seed: int, n: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8))


def test_queued_requests_share_forwards_and_get_their_own_rows(classifiers) -> None:
    zs, adapted = classifiers
    batcher = Batcher(max_batch=64)
    inputs = [(zs if i % 3 else adapted, _batch(i, 1 + i % 3)) for i in range(12)]
    expected = [clf.predict_uint8(x) for clf, x in inputs]
    with batcher._busy:  # a forward "in progress": everything below queues behind it
        futures = [batcher.submit(clf, x) for clf, x in inputs]
        assert not any(f.done() for f in futures)
    got = [f.result(timeout=30) for f in futures]
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)
    # 12 requests of two models: grouped by model, so far fewer forwards than requests.
    assert batcher.forwards <= 4, batcher.forwards
    assert batcher.batched_requests >= 10


def test_a_lone_request_runs_in_the_callers_thread(classifiers) -> None:
    zs, _ = classifiers
    batcher = Batcher()
    seen: list[str] = []
    real = zs.predict_uint8

    def spy(x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return real(x, batch_size)

    zs.predict_uint8 = spy  # type: ignore[method-assign]
    try:
        batcher.submit(zs, _batch(0, 2)).result(timeout=30)
    finally:
        del zs.predict_uint8
    assert seen == [threading.current_thread().name]
    assert batcher._thread is None  # no hand-off thread was needed


def test_a_failing_forward_fails_its_requests_and_the_batcher_lives_on(classifiers) -> None:
    zs, _ = classifiers
    batcher = Batcher()
    with batcher._busy:
        bad = batcher.submit(zs, torch.zeros(1, 5, 32, 32, dtype=torch.uint8))  # 5 channels: it raises
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for the shape
        bad.result(timeout=30)
    # Concurrent requests after the failure are still answered.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: batcher.submit(zs, _batch(i, 1)).result(timeout=30), range(16)))
    assert all(r.shape == (1, 3) for r in results)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(size))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_prediction_decode_keeps_the_upload_rules_in_one_pass() -> None:
    limits = Limits(1_000_000, 500 * 500, 8, max_archive_members=10, max_archive_bytes=10_000_000)
    data = _png((40, 30))
    square = decode_for_prediction(Candidate("a.png", data, None), limits, 32)
    assert isinstance(square, np.ndarray) and square.shape == (32, 32, 3)
    np.testing.assert_array_equal(square, to_square_uint8(Image.open(io.BytesIO(data)), 32))
    # The same refusals, with the same codes, as a stored upload.
    for name, blob in {
        "empty.png": b"",
        "cut.png": data[: len(data) // 2],
        "huge.png": _png((600, 600)),
        "tiny.png": _png((4, 4)),
        "text.png": b"not an image at all",
    }.items():
        want = decode_image(Candidate(name, blob, None), limits)
        got = decode_for_prediction(Candidate(name, blob, None), limits, 32)
        assert isinstance(want, Rejection) and isinstance(got, Rejection), name
        assert got.code == want.code, (name, got.code, want.code)
    # A large JPEG is decoded at reduced scale (draft) and still becomes the model's square.
    big = decode_for_prediction(Candidate("big.jpg", _jpeg((480, 400)), None), limits, 32)
    assert isinstance(big, np.ndarray) and big.shape == (32, 32, 3)


def test_model_rows_are_cached_per_owner_for_the_ttl_and_forgotten_on_delete() -> None:
    from app.core.settings import Settings
    from app.models.runtime import ModelRow, ModelRuntime

    runtime = ModelRuntime(Settings(classify_model_row_ttl_s=60))
    reads: list[str] = []

    def read_for(owner: str) -> ModelRow:
        reads.append(owner)
        return ModelRow("m1", owner, "c", "lafter", "base", ("a", "b"))

    assert runtime.model_row("alice", "m1", lambda: read_for("alice")).owner_id == "alice"
    assert runtime.model_row("alice", "m1", lambda: read_for("alice")).owner_id == "alice"
    assert reads == ["alice"]  # the second request read no row
    # another owner's request never sees alice's cached row: its own read decides (404 or its row)
    assert runtime.model_row("bob", "m1", lambda: read_for("bob")).owner_id == "bob"
    assert reads == ["alice", "bob"]
    runtime.forget("m1")  # a delete through this process
    runtime.model_row("alice", "m1", lambda: read_for("alice"))
    assert reads == ["alice", "bob", "alice"]

    def missing() -> ModelRow:
        raise LookupError("no such model")

    with pytest.raises(LookupError):
        runtime.model_row("alice", "m2", missing)
    with pytest.raises(LookupError):  # a failed read caches nothing
        runtime.model_row("alice", "m2", missing)

    uncached = ModelRuntime(Settings(classify_model_row_ttl_s=0))
    reads.clear()
    for _ in range(3):
        uncached.model_row("alice", "m1", lambda: read_for("alice"))
    assert reads == ["alice"] * 3
