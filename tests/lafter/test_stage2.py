"""Stage 2 (LaFTer finetuning), the trainable set, the views, and the adapted-model artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lafter.artifact import AdaptedModel
from lafter.backbone import load_backbone
from lafter.errors import ArtifactMismatchError, Cancelled, CorruptArtifactError, InvalidInputError
from lafter.finetune import AdaptConfig, adapt
from lafter.predict import AdaptedClassifier, ZeroShotClassifier
from lafter.prompted import PromptedTower, _PromptedForward
from lafter.text_classifier import train_text_classifier
from lafter.views import ImageCache, ViewMaker

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(TINY, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + i % 7, 48, 3), dtype=np.uint8)) for i in range(24)]


@pytest.fixture(scope="module")
def text_head(backbone):
    sentences = [
        t.format(c) for c in CLASSES for t in ("a photo of a {}.", "art of the {}.", "a {} in a game.")
    ]
    labels = [i for i in range(len(CLASSES)) for _ in range(3)]
    return train_text_classifier(backbone.encode_text(sentences), labels, len(CLASSES), seed=0).head


def test_trainable_set_vit_b32_is_exactly_83456_and_nothing_else_changes():
    bb = load_backbone("ViT-B-32::random", device="cpu")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    head = torch.nn.Linear(bb.embed_dim, 10, bias=False)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    res = adapt(bb, head, imgs, [f"c{i}" for i in range(10)], AdaptConfig(batch_size=2, max_steps=2), seed=0)
    assert res.resolved["trainable_parameters"] == 83_456 == 38_400 + 39_936 + 5_120
    assert res.model.num_parameters == 83_456
    assert res.steps == 2
    # the tuned tensors moved, the base did not move at all (bitwise)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(before[k], v), k
    ln = res.model.layernorms
    assert len(ln) == 2 * 26  # ln_pre, 2 per block x 12, ln_post; weight + bias each
    assert any(not torch.equal(t, before[f"visual.{n}"]) for n, t in ln.items())


def test_layernorms_selected_by_type_not_name(backbone):
    names = PromptedTower(backbone.visual).ln_names
    modules = dict(backbone.visual.named_modules())
    assert names[0] == "ln_pre.weight" and names[-1] == "ln_post.bias"
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.LayerNorm) for n in names)
    n_blocks = len(backbone.visual.transformer.resblocks)
    assert len(names) == 2 * (2 + 2 * n_blocks)


def test_teacher_is_unprompted_weak_view_through_frozen_text_head(backbone, images, text_head, monkeypatch):
    calls: list[bool] = []
    original = _PromptedForward.forward

    def spy(self, x, prompts=None):
        calls.append(prompts is None)
        return original(self, x, prompts)

    monkeypatch.setattr(_PromptedForward, "forward", spy)
    cache = ImageCache.from_pil(images, backbone.image_size)
    events = []
    head_before = text_head.weight.clone()
    cfg = AdaptConfig(recipe="paper", batch_size=len(images), max_steps=3, log_every=1)
    res = adapt(backbone, text_head, cache, CLASSES, cfg, seed=0, progress=events.append)
    # each step: one teacher call without prompts, then one student call with prompts
    assert calls == [True, False] * 3
    # the pseudo-labelling head is frozen: the caller's stage-1 head is untouched
    assert torch.equal(text_head.weight, head_before)
    # step-1 pseudo-labels == argmax of the stage-1 head on normalised, unprompted weak-view features
    monkeypatch.setattr(_PromptedForward, "forward", original)
    text_model = AdaptedModel.from_text_head(backbone.spec, CLASSES, text_head)
    expected = AdaptedClassifier(backbone, text_model).predict_uint8(cache.data).argmax(1)
    assert events[0].metrics["pseudo_label_histogram"] == torch.bincount(expected, minlength=3).tolist()
    assert res.pseudo_label_histogram == [
        sum(e.metrics["pseudo_label_histogram"][c] for e in events) for c in range(3)
    ]


def test_head_starts_from_stage1_head_and_prompts_use_reference_init(backbone, images, text_head):
    cfg = AdaptConfig(recipe="paper", batch_size=8, max_steps=1, learning_rate=0.0, weight_decay=0.0)
    res = adapt(backbone, text_head, images, CLASSES, cfg, seed=0)
    assert torch.equal(res.model.head_weight, text_head.weight)
    bound = (6.0 / (3 * 16 * 16 + backbone.width)) ** 0.5
    prompts = res.model.prompts
    assert prompts is not None and prompts.shape == (50, backbone.width)
    assert float(prompts.abs().max()) <= bound and float(prompts.abs().max()) > 0.9 * bound


def test_seeded_cpu_run_is_repeatable_and_seed_matters(backbone, images, text_head):
    cfg = AdaptConfig(batch_size=8, max_steps=4)
    a = adapt(backbone, text_head, images, CLASSES, cfg, seed=3).model.tensors
    b = adapt(backbone, text_head, images, CLASSES, cfg, seed=3).model.tensors
    c = adapt(backbone, text_head, images, CLASSES, cfg, seed=4).model.tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["prompts"], c["prompts"])


def test_cancellation_between_steps(backbone, images, text_head):
    polls = {"n": 0}

    def should_cancel() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    with pytest.raises(Cancelled) as err:
        adapt(
            backbone,
            text_head,
            images,
            CLASSES,
            AdaptConfig(batch_size=4, max_steps=10),
            should_cancel=should_cancel,
        )
    assert err.value.step == 2 and err.value.stage == "adapting"


def test_auto_schedule_is_derived_and_echoed():
    paper = AdaptConfig(recipe="paper")
    r = paper.resolve(500)
    assert (r["batch_size"], r["epochs"], r["steps_per_epoch"], r["total_steps"]) == (50, 40, 10, 400)
    big = paper.resolve(100_000)
    assert big["epochs"] == 1 and big["total_steps"] == 2000
    small = paper.resolve(30)
    assert small["batch_size"] == 30 and small["epochs"] == 50
    assert AdaptConfig(epochs=2, batch_size=7, max_steps=3).resolve(30)["total_steps"] == 3
    # the default recipe gives small sets enough steps (at least 1,000, at most 200 epochs), big sets an epoch
    d = AdaptConfig().resolve(500)
    assert (d["epochs"], d["total_steps"]) == (100, 1000)
    assert AdaptConfig().resolve(100_000)["total_steps"] == 2000
    assert AdaptConfig().resolve(30)["epochs"] == 200


def test_paper_recipe_is_the_reference_and_default_scales_with_the_input():
    ref = AdaptConfig(recipe="paper").resolve(1000, image_size=32, patches=16)
    assert ref["prompt_tokens"] == 50
    assert ref["strong_crop_scale"] == [0.2, 1.0] and ref["strong_blur_sigma"] == [0.1, 2.0]
    assert ref["pseudo_label_balance"] == "none" and ref["balance_prior_init"] == "first_batch"
    # at ViT-B/32's own scale the default recipe's views and prompts are the reference's
    at224 = AdaptConfig().resolve(1000, image_size=224, patches=49)
    assert at224["prompt_tokens"] == 50
    assert at224["strong_crop_scale"] == [0.2, 1.0] and at224["strong_blur_sigma"] == [0.1, 2.0]
    assert at224["pseudo_label_balance"] == "align" and at224["balance_prior_init"] == "pool"
    small = AdaptConfig().resolve(1000, image_size=32, patches=16)
    assert small["prompt_tokens"] == 16  # at ViT-B/32's width: in proportion to the patches
    assert small["strong_blur_sigma"][1] < 0.3 and 0.4 < small["strong_crop_scale"][0] <= 0.5
    # and in proportion to the width: the benchmark's 96-wide towers (16 and 49 patches), the floor of 4
    assert AdaptConfig().resolve(1000, image_size=32, patches=16, width=96)["prompt_tokens"] == 4
    assert AdaptConfig().resolve(1000, image_size=70, patches=49, width=96)["prompt_tokens"] == 6
    assert AdaptConfig().resolve(1000, image_size=224, patches=49, width=384)["prompt_tokens"] == 25
    # ViT-B/16 (196 patches) and ViT-L/14 (256 x 1024) keep the reference's 50; an explicit value wins
    assert AdaptConfig().resolve(1000, image_size=224, patches=196)["prompt_tokens"] == 50
    assert AdaptConfig().resolve(1000, image_size=224, patches=256, width=1024)["prompt_tokens"] == 50
    explicit = AdaptConfig(prompt_tokens=7, strong_blur_sigma=(0.1, 2.0), pseudo_label_balance="none")
    e = explicit.resolve(1000, image_size=32, patches=16)
    assert (e["prompt_tokens"], e["strong_blur_sigma"], e["pseudo_label_balance"]) == (7, [0.1, 2.0], "none")
    with pytest.raises(InvalidInputError):
        AdaptConfig(recipe="fast")  # type: ignore[arg-type]


def test_weak_view_matches_reference_transform(backbone, images):
    cache = ImageCache.from_pil(images, backbone.image_size)
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std)
    ref = T.Compose(
        [
            T.Resize(backbone.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(backbone.image_size),
            T.ToTensor(),
            T.Normalize(backbone.mean, backbone.std),
        ]
    )
    expected = torch.stack([ref(im) for im in images])
    assert torch.allclose(views.weak(cache.data), expected, atol=1e-5)


def test_strong_views_have_per_sample_random_parameters():
    torch.manual_seed(0)
    size = 32
    views = ViewMaker(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # one colourful, asymmetric image repeated: any difference between outputs comes from the augmentation
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[0, :, : size // 2] = 255
    img[1, : size // 2] = 200
    img[2, ::4] = 90
    batch = img.unsqueeze(0).repeat(400, 1, 1, 1)
    strong = views.strong(batch) * 0.5 + 0.5  # undo normalisation
    assert strong.shape == (400, 3, size, size)
    flat = strong.flatten(1)
    distinct = torch.unique(flat.round(decimals=4), dim=0).shape[0]
    assert distinct == 400  # every sample got its own crop/jitter/blur
    gray = ((strong[:, 0] - strong[:, 1]).abs().amax(dim=(1, 2)) < 1e-4) & (
        (strong[:, 1] - strong[:, 2]).abs().amax(dim=(1, 2)) < 1e-4
    )
    assert 0.12 < gray.float().mean().item() < 0.28  # RandomGrayscale p=0.2
    weak = views.weak(batch[:2])
    assert torch.equal(weak[0], weak[1])  # the weak view is deterministic


def test_artifact_round_trip_reproduces_predictions(backbone, images, text_head, tmp_path):
    res = adapt(backbone, text_head, images, CLASSES, AdaptConfig(batch_size=8, max_steps=3), seed=1)
    path = tmp_path / "model.safetensors"
    checksum = res.model.save(path)
    loaded = AdaptedModel.load(path)
    assert loaded.checksum == checksum and loaded.class_names == CLASSES and loaded.base_spec == TINY
    p1 = AdaptedClassifier(backbone, res.model).predict_images(images)
    p2 = AdaptedClassifier(backbone, loaded).predict_images(images)
    assert torch.equal(p1, p2)
    # only the tuned tensors are stored: a few KB, not the base model
    assert path.stat().st_size < 4 * res.model.num_parameters + 4096


def test_corrupt_and_mismatched_artifacts_are_refused(backbone, images, text_head, tmp_path):
    res = adapt(backbone, text_head, images, CLASSES, AdaptConfig(batch_size=8, max_steps=1), seed=1)
    data = bytearray(res.model.to_bytes())
    data[-3] ^= 0x40  # flip a bit inside the tensor data
    with pytest.raises(CorruptArtifactError, match="checksum"):
        AdaptedModel.from_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError):
        AdaptedModel.from_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptArtifactError):
        AdaptedModel.from_bytes(bytes(data[: len(data) // 2]))
    other = load_backbone("ViT-B-32::random", device="cpu")
    with pytest.raises(ArtifactMismatchError, match="adapted from"):
        AdaptedClassifier(other, res.model)
    with pytest.raises(ArtifactMismatchError):
        AdaptedClassifier(other, res.model, strict_spec=False)  # shapes do not fit either


def test_zero_shot_and_text_classifier_share_the_prediction_interface(backbone, images, text_head):
    zs = ZeroShotClassifier(backbone, CLASSES)
    probs = zs.predict_images(images[:5])
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5))
    top = zs.top_k(images[:2], k=10)  # capped at the class count, sorted by score
    assert [len(t) for t in top] == [3, 3]
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in top)
    restored = AdaptedModel.from_bytes(AdaptedModel.zero_shot(backbone, CLASSES).to_bytes())
    assert restored.kind == "zero_shot"
    assert torch.equal(AdaptedClassifier(backbone, restored).predict_images(images[:5]), probs)


def test_distribution_alignment_option_spreads_a_biased_teachers_pseudo_labels(backbone, images, text_head):
    cache = ImageCache.from_pil(images, backbone.image_size)
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(backbone.model.encode_image(views.weak(cache.data)), dim=-1)
        mean = torch.nn.functional.normalize(feats.mean(0), dim=0)
        assert (feats @ mean).min() > 0.5  # the features share a direction: use it to bias class 0
    biased = torch.nn.Linear(text_head.in_features, len(CLASSES), bias=False)
    with torch.no_grad():
        biased.weight.copy_(0.1 * text_head.weight)
        biased.weight[0] += 10.0 * mean
    hist = {}
    for balance in ("none", "align"):
        cfg = AdaptConfig(
            recipe="paper",
            batch_size=len(images),
            max_steps=4,
            learning_rate=0.0,
            pseudo_label_balance=balance,
        )
        hist[balance] = adapt(backbone, biased, cache, CLASSES, cfg, seed=0).pseudo_label_histogram
    assert hist["none"][0] == sum(hist["none"])  # the method as published: class 0 takes everything
    assert max(hist["align"]) < sum(hist["align"])  # aligned: other classes get pseudo-labels too
    assert AdaptConfig(recipe="paper").resolve(8)["pseudo_label_balance"] == "none"  # the method


def test_alignment_prior_starts_from_a_teacher_pass_over_the_images(backbone, images, text_head):
    """The default recipe's running prior starts as the teacher's mean probabilities over the images
    (not one batch), and the warm-up draws no random numbers: the same pseudo-labels as a run whose
    prior starts from the first batch, while that prior is the same."""
    cache = ImageCache.from_pil(images, backbone.image_size)
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(backbone.model.encode_image(views.weak(cache.data)), dim=-1)
        expected = text_head(feats).softmax(1).mean(0)
    priors: dict[str, list[float]] = {}

    def keep(init: str):
        def hook(step, total, snapshot):
            if step == 1:
                priors[init] = snapshot().teacher_prior

        return hook

    for init in ("pool", "first_batch"):
        cfg = AdaptConfig(batch_size=4, max_steps=1, balance_momentum=1.0, balance_prior_init=init)
        adapt(backbone, text_head, cache, CLASSES, cfg, seed=0, checkpoint=keep(init))
    assert torch.allclose(torch.tensor(priors["pool"]), expected, atol=1e-5)
    assert not torch.allclose(torch.tensor(priors["first_batch"]), expected, atol=1e-3)
