"""The guard: label-free choice of the classifier to serve, and the labelled override."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lafter.artifact import AdaptedModel
from lafter.backbone import load_backbone
from lafter.descriptions import DescriptionConfig
from lafter.finetune import AdaptConfig
from lafter.guard import evaluate_candidates, kappa, label_free_choice, neighbour_consistency
from lafter.pipeline import run_lafter
from lafter.predict import AdaptedClassifier
from lafter.views import ImageCache

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"
CLASSES = ["circle", "square", "triangle"]


def _clusters(n_per: int = 30, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1) * 5
    feats = torch.cat([centres[c] + 0.3 * torch.randn(n_per, 16, generator=g) for c in range(k)])
    labels = torch.arange(k).repeat_interleave(n_per)
    return feats, labels


def test_neighbour_consistency_rewards_labels_that_follow_the_clusters():
    feats, labels = _clusters()
    assert neighbour_consistency(feats, labels) > 0.95
    # a one-class classifier agrees with every neighbour, and scores 0 after the chance correction
    assert neighbour_consistency(feats, torch.zeros_like(labels)) == 0.0
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert abs(neighbour_consistency(feats, shuffled)) < 0.15
    # half of one cluster relabelled: in between
    partly = labels.clone()
    partly[:15] = 1
    assert 0.3 < neighbour_consistency(feats, partly) < neighbour_consistency(feats, labels)


def test_kappa_corrects_agreement_for_chance():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert kappa(a, a, 3) == pytest.approx(1.0)
    # a biased baseline that predicts class 0 everywhere: 1/3 raw agreement, but only chance
    assert kappa(a, torch.zeros_like(a), 3) == pytest.approx(0.0)
    # a permutation of the classes agrees less than chance
    assert kappa(a, (a + 1) % 3, 3) < 0


def test_label_free_rule():
    scores = {"zero_shot": 0.60, "text_classifier": 0.45, "lafter": 0.30}
    # the adapted model is served unless it is dominated by one class or lost the class names, even
    # when the baselines follow the base features' clusters better (they are linear in them)
    assert label_free_choice(scores, dominated=False, kappa_with_zero_shot=0.10)[0] == "lafter"
    kind, reason = label_free_choice(scores, dominated=True, kappa_with_zero_shot=0.10)
    assert kind == "zero_shot" and "swallowed" in reason
    kind, reason = label_free_choice(scores, dominated=False, kappa_with_zero_shot=0.01, min_kappa=0.03)
    assert kind == "zero_shot" and "chance" in reason
    # the fallback is zero-shot, the free baseline, even when the text classifier follows the
    # clusters better (which served it up to 14.8 points below zero-shot in bench/quality.py)
    flipped = {"zero_shot": 0.40, "text_classifier": 0.55, "lafter": 0.9}
    kind, reason = label_free_choice(flipped, dominated=True, kappa_with_zero_shot=0.5)
    assert kind == "zero_shot" and "free baseline" in reason
    assert label_free_choice({"zero_shot": 0.4, "text_classifier": 0.5}, False, None)[0] == "zero_shot"
    # without a zero-shot candidate, the text classifier
    assert label_free_choice({"text_classifier": 0.5, "lafter": 0.9}, True, None)[0] == "text_classifier"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone(TINY, device="cpu")


@pytest.fixture(scope="module")
def cache(backbone) -> ImageCache:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    return ImageCache.from_pil(imgs, backbone.image_size)


def test_run_lafter_evaluates_and_serves_one_of_the_three(backbone, cache):
    run = run_lafter(
        backbone,
        CLASSES,
        cache,
        descriptions=DescriptionConfig(source="templates"),
        adapt_config=AdaptConfig(batch_size=8, max_steps=3),
        seed=0,
    )
    assert run.served_kind in ("lafter", "text_classifier", "zero_shot")
    guard = run.evaluation["guard"]
    assert set(guard["cluster_consistency"]) == {"zero_shot", "text_classifier", "lafter"}
    assert run.evaluation["selection"]["served"] == run.served_kind
    assert run.served_model.kind == run.served_kind
    assert run.evaluation["images"] == 40 and "labelled" not in run.evaluation
    # the choice is the rule applied to the reported scores
    rule = label_free_choice(guard["cluster_consistency"], guard["dominated"], guard["kappa_with_zero_shot"])
    assert rule[0] == run.served_kind
    if run.served_kind != "lafter":
        assert any(w["code"] == "adaptation_not_served" for w in run.warnings)


def test_labelled_split_decides_by_accuracy(backbone, cache):
    zs = AdaptedModel.zero_shot(backbone, CLASSES)
    # a "text classifier" that is the zero-shot head, and an "adapted model" that predicts class 0
    # everywhere: with labels that are zero-shot's own predictions, zero-shot/text tie at 100%
    always0 = AdaptedModel(
        backbone.spec,
        CLASSES,
        {
            "head.weight": torch.stack(
                [zs.head_weight[0] * 0 + 1, zs.head_weight[1] * 0, zs.head_weight[2] * 0]
            )
        },
        kind="lafter",
        normalize_features=True,
    )
    text = AdaptedModel(
        backbone.spec, CLASSES, {"head.weight": zs.head_weight.clone()}, "text_classifier", True
    )
    labels = AdaptedClassifier(backbone, zs).predict_uint8(cache.data).argmax(1).tolist()
    ev = evaluate_candidates(
        backbone, {"zero_shot": zs, "text_classifier": text, "lafter": always0}, cache, cache, labels
    )
    assert ev.report["labelled"]["accuracy"]["zero_shot"] == 1.0
    assert ev.served == "text_classifier"  # tie with zero-shot goes to the text classifier
    assert any(w["code"] == "adaptation_worse" for w in ev.warnings)
    assert "guard_would_serve" in ev.report["labelled"]
    # confusion matrices: rows true class, columns predicted, in CLASSES order; each row sums to the
    # images of its class. Zero-shot predicts its own labels (diagonal); "always 0" fills column 0.
    per_class = [labels.count(i) for i in range(len(CLASSES))]
    confusion = ev.report["labelled"]["confusion"]
    assert set(confusion) == {"zero_shot", "text_classifier", "lafter"}
    assert confusion["zero_shot"] == [[per_class[i] if i == j else 0 for j in range(3)] for i in range(3)]
    assert confusion["lafter"] == [[n, 0, 0] for n in per_class]
    for matrix in confusion.values():
        assert [sum(row) for row in matrix] == per_class


def test_confusion_is_left_out_for_many_classes(backbone, cache):
    names = [f"class {i}" for i in range(51)]
    zs = AdaptedModel.zero_shot(backbone, names)
    labels = [i % 51 for i in range(len(cache))]
    ev = evaluate_candidates(backbone, {"zero_shot": zs}, cache, cache, labels)
    assert ev.report["labelled"]["confusion_omitted"] == "too many classes"
    assert "confusion" not in ev.report["labelled"] and "zero_shot" in ev.report["labelled"]["accuracy"]
