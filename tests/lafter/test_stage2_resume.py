"""Stage 2 checkpoints: a run resumed from a snapshot ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lafter.backbone import load_backbone
from lafter.checkpoint import RunCheckpoint
from lafter.errors import Cancelled, InvalidInputError
from lafter.finetune import AdaptCheckpoint, AdaptConfig, AdaptResult, adapt
from lafter.text_classifier import train_text_classifier
from lafter.views import ImageCache

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"
CLASSES = ["circle", "square", "triangle"]
# 24 images in batches of 8: 3 steps per epoch, so 7 steps cross two epoch boundaries.
CONFIG = AdaptConfig(batch_size=8, epochs=3, max_steps=7, prompt_tokens=4, log_every=2)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(TINY, device="cpu")


@pytest.fixture(scope="module")
def cache(backbone) -> ImageCache:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(24)]
    return ImageCache.from_pil(images, backbone.image_size)


@pytest.fixture(scope="module")
def text_head(backbone):
    sentences = [f"a photo of a {c}." for c in CLASSES] + [f"art of the {c}." for c in CLASSES]
    labels = [0, 1, 2, 0, 1, 2]
    return train_text_classifier(backbone.encode_text(sentences), labels, len(CLASSES), seed=0).head


def _load(data: bytes) -> AdaptCheckpoint:
    return RunCheckpoint.from_bytes(data).adapt


def _recorder() -> tuple[list[tuple[int, int]], dict[int, bytes], Callable[..., None]]:
    calls: list[tuple[int, int]] = []
    saved: dict[int, bytes] = {}

    def hook(step: int, total: int, snapshot: Callable[[], AdaptCheckpoint]) -> None:
        calls.append((step, total))
        saved[step] = RunCheckpoint(snapshot()).to_bytes()  # through bytes, as a worker stores it

    return calls, saved, hook


@pytest.fixture(scope="module")
def uninterrupted(backbone, cache, text_head) -> tuple[AdaptResult, list[tuple[int, int]], dict[int, bytes]]:
    calls, saved, hook = _recorder()
    result = adapt(backbone, text_head, cache, CLASSES, CONFIG, seed=5, checkpoint=hook)
    return result, calls, saved


def _same_model(a: AdaptResult, b: AdaptResult) -> None:
    ta, tb = a.model.tensors, b.model.tensors
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_hook_sees_every_step(uninterrupted) -> None:
    result, calls, _ = uninterrupted
    assert calls == [(s, 7) for s in range(1, 8)]
    assert result.steps == 7 and result.resumed_from_step == 0


@pytest.mark.parametrize("at", [3, 4, 7], ids=["epoch-boundary", "mid-epoch", "last-step"])
def test_resumed_run_equals_uninterrupted_run(backbone, cache, text_head, uninterrupted, at) -> None:
    full, _, saved = uninterrupted
    snapshot = _load(saved[at])
    assert snapshot.step == at
    calls, _, hook = _recorder()
    resumed = adapt(
        backbone, text_head, cache, CLASSES, CONFIG, seed=5, checkpoint=hook, resume_from=snapshot
    )
    _same_model(resumed, full)
    assert resumed.steps == 7 and resumed.resumed_from_step == at
    assert [s for s, _ in calls] == list(range(at + 1, 8))
    assert resumed.pseudo_label_histogram == full.pseudo_label_histogram
    assert resumed.history == full.history


def test_snapshots_are_copies_not_views_of_the_live_run(uninterrupted) -> None:
    full, _, saved = uninterrupted
    early = _load(saved[1])
    assert not torch.equal(early.trainable["prompts"], full.model.tensors["prompts"])
    assert early.optimizer["state"]  # the AdamW moments travel with it


def test_a_resumed_run_can_be_cancelled_and_counts_all_its_steps(backbone, cache, text_head, uninterrupted):
    _, _, saved = uninterrupted
    polls = {"n": 0}

    def stop_after_two() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    with pytest.raises(Cancelled) as err:
        adapt(
            backbone,
            text_head,
            cache,
            CLASSES,
            CONFIG,
            seed=5,
            resume_from=_load(saved[3]),
            should_cancel=stop_after_two,
        )
    assert err.value.step == 5


def test_resuming_another_run_is_refused(backbone, cache, text_head, uninterrupted) -> None:
    _, _, saved = uninterrupted
    snapshot = _load(saved[3])
    with pytest.raises(InvalidInputError, match="seed"):
        adapt(backbone, text_head, cache, CLASSES, CONFIG, seed=6, resume_from=snapshot)
    with pytest.raises(InvalidInputError, match="batch_size"):
        other = AdaptConfig(batch_size=6, epochs=3, max_steps=7, prompt_tokens=4)
        adapt(backbone, text_head, cache, CLASSES, other, seed=5, resume_from=snapshot)
    with pytest.raises(InvalidInputError, match="not a stage-2 checkpoint"):
        _load(b"not a checkpoint")


def test_resume_keeps_the_teacher_prior_of_distribution_alignment(backbone, cache, text_head) -> None:
    aligned = AdaptConfig(batch_size=8, epochs=3, max_steps=7, prompt_tokens=4, pseudo_label_balance="align")
    _, saved, hook = _recorder()
    full = adapt(backbone, text_head, cache, CLASSES, aligned, seed=5, checkpoint=hook)
    snapshot = _load(saved[4])
    assert snapshot.teacher_prior is not None and abs(sum(snapshot.teacher_prior) - 1.0) < 1e-4
    resumed = adapt(backbone, text_head, cache, CLASSES, aligned, seed=5, resume_from=snapshot)
    _same_model(resumed, full)
    assert resumed.pseudo_label_histogram == full.pseudo_label_histogram
