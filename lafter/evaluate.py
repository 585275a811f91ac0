"""Evaluation of an adaptation run: label-free diagnostics, accuracy on a labelled split, collapse
detection, and the rule that picks which classifier a user is served. Pure torch: no service code.

Self-training can make a classifier worse (the pseudo-labels reinforce their own mistakes, and a
class can swallow them all). So:

- with labelled evaluation images, the served model is the most accurate of zero-shot CLIP, the
  stage-1 text classifier and the adapted model (``select_best``), and the reason is recorded;
- without them, the adapted model is served, and a collapse (``detect_collapse``) is flagged as a
  warning, never hidden.

Collapse thresholds, for ``C`` classes and predictions on the (unlabelled) training images:

- *dominance*: the most predicted class takes more than ``max(0.5, min(0.9, 3 / C))`` of the images
  (a class-balanced set gives ``1 / C``; 2 classes: 0.9, 6+ classes: 0.5), **and** more than the
  zero-shot model's own top share plus ``0.15`` (so a set that really is imbalanced, as zero-shot
  CLIP also sees it, is not flagged);
- *agreement floor*: the adapted and zero-shot predictions agree on fewer than
  ``min(0.5, 0.2 + 1 / C)`` of the images (chance agreement is about ``1 / C``; 2 classes: 0.5,
  10 classes: 0.3, 100 classes: 0.21).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("lafter", "text_classifier", "zero_shot")
# On an accuracy tie the adapted model wins (it is what was asked for), then the text classifier.
PREFERENCE = {"lafter": 0, "text_classifier": 1, "zero_shot": 2}
DOMINANCE_MARGIN = 0.15
# A confusion matrix is C*C counts stored in the job's JSON: above this many classes it is left out
# (the accuracies stay) so a 1000-class job does not store a million numbers.
MAX_CONFUSION_CLASSES = 50


def predictions(probs: torch.Tensor) -> torch.Tensor:
    return probs.argmax(dim=-1)


def pseudo_label_histogram(probs: torch.Tensor, num_classes: int | None = None) -> list[int]:
    """How many images each class wins (argmax)."""
    c = num_classes if num_classes is not None else probs.shape[-1]
    if probs.numel() == 0:
        return [0] * c
    return [int(v) for v in torch.bincount(predictions(probs), minlength=c).tolist()]


def agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Fraction of images on which two classifiers predict the same class."""
    if probs_a.shape[0] != probs_b.shape[0]:
        raise ValueError("agreement needs predictions for the same images")
    if probs_a.shape[0] == 0:
        return 1.0
    return float((predictions(probs_a) == predictions(probs_b)).float().mean().item())


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean top-1 probability."""
    if probs.shape[0] == 0:
        return 0.0
    return float(probs.max(dim=-1).values.mean().item())


def accuracy(probs: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
    y = torch.as_tensor(labels, dtype=torch.long)
    if y.numel() == 0:
        raise ValueError("accuracy needs at least one labelled image")
    return float((predictions(probs) == y).float().mean().item())


def confusion_matrix(
    probs: torch.Tensor, labels: torch.Tensor | Sequence[int], num_classes: int
) -> list[list[int]]:
    """Counts of (true class, predicted class): row ``i`` holds the images labelled ``i``, column ``j``
    those predicted ``j``; each row sums to the number of images of its class."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if y.shape[0] != probs.shape[0]:
        raise ValueError("confusion_matrix needs one label per prediction")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    cells = torch.bincount(y * num_classes + predictions(probs), minlength=num_classes * num_classes)
    return [[int(v) for v in row] for row in cells.view(num_classes, num_classes).tolist()]


def dominance_threshold(num_classes: int) -> float:
    return max(0.5, min(0.9, 3.0 / num_classes))


def agreement_floor(num_classes: int) -> float:
    return min(0.5, 0.2 + 1.0 / num_classes)


def top_share(histogram: Sequence[int]) -> float:
    total = sum(histogram)
    return max(histogram) / total if total else 0.0


@dataclass(frozen=True)
class CollapseReport:
    collapsed: bool
    reasons: list[str]
    top_class: str | None
    top_share: float
    zero_shot_top_share: float
    agreement_with_zero_shot: float
    thresholds: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "collapsed": self.collapsed,
            "reasons": list(self.reasons),
            "top_class": self.top_class,
            "top_share": round(self.top_share, 4),
            "zero_shot_top_share": round(self.zero_shot_top_share, 4),
            "agreement_with_zero_shot": round(self.agreement_with_zero_shot, 4),
            "thresholds": self.thresholds,
        }


def detect_collapse(
    adapted_probs: torch.Tensor,
    zero_shot_probs: torch.Tensor,
    class_names: Sequence[str],
    *,
    max_share: float | None = None,
    min_agreement: float | None = None,
) -> CollapseReport:
    """Flag a self-training collapse from label-free evidence (see the module docstring)."""
    c = len(class_names)
    share_limit = dominance_threshold(c) if max_share is None else max_share
    floor = agreement_floor(c) if min_agreement is None else min_agreement
    hist = pseudo_label_histogram(adapted_probs, c)
    zs_hist = pseudo_label_histogram(zero_shot_probs, c)
    share = top_share(hist)
    zs_share = top_share(zs_hist)
    agree = agreement(adapted_probs, zero_shot_probs)
    top = class_names[max(range(c), key=lambda i: hist[i])] if sum(hist) else None
    reasons = []
    if share > share_limit and share > zs_share + DOMINANCE_MARGIN:
        reasons.append(
            f"class {top!r} takes {share:.0%} of the predictions "
            f"(zero-shot: {zs_share:.0%}; limit {share_limit:.0%})"
        )
    if agree < floor:
        reasons.append(f"agreement with zero-shot CLIP fell to {agree:.0%} (floor {floor:.0%})")
    return CollapseReport(
        collapsed=bool(reasons),
        reasons=reasons,
        top_class=top,
        top_share=share,
        zero_shot_top_share=zs_share,
        agreement_with_zero_shot=agree,
        thresholds={"max_share": round(share_limit, 4), "min_agreement": round(floor, 4)},
    )


def diagnostics(probs: Mapping[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, Any]:
    """Label-free numbers for each classifier, plus agreement of each with zero-shot."""
    out: dict[str, Any] = {}
    zs = probs.get("zero_shot")
    for kind, p in probs.items():
        item: dict[str, Any] = {
            "pseudo_label_histogram": dict(
                zip(class_names, pseudo_label_histogram(p, len(class_names)), strict=True)
            ),
            "mean_confidence": round(mean_confidence(p), 4),
        }
        if zs is not None and kind != "zero_shot":
            item["agreement_with_zero_shot"] = round(agreement(p, zs), 4)
        out[kind] = item
    return out


@dataclass(frozen=True)
class Selection:
    kind: str
    reason: str
    accuracies: dict[str, float] = field(default_factory=dict)
    worse_than_baseline: bool = False


def select_best(accuracies: Mapping[str, float], num_images: int) -> Selection:
    """The most accurate on the labelled split; ties go to the adapted model, then the text classifier.
    ``worse_than_baseline`` says the adapted model lost, which the job reports as a warning."""
    if not accuracies:
        raise ValueError("select_best needs at least one accuracy")
    unknown = set(accuracies) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown classifier kinds: {sorted(unknown)}")
    best = min(accuracies, key=lambda k: (-accuracies[k], PREFERENCE[k]))
    shown = ", ".join(f"{k} {accuracies[k]:.1%}" for k in sorted(accuracies, key=lambda k: PREFERENCE[k]))
    adapted = accuracies.get("lafter")
    worse = adapted is not None and best != "lafter"
    if best == "lafter":
        reason = (
            f"the adapted model is the most accurate on {num_images} labelled evaluation images ({shown})"
        )
    else:
        reason = (
            f"{best} is more accurate than the adapted model on {num_images} labelled evaluation images "
            f"({shown}); serving {best} instead of a worse model"
        )
    return Selection(kind=best, reason=reason, accuracies=dict(accuracies), worse_than_baseline=worse)
