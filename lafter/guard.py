"""The guard: which classifier a user is served, with or without labels.

A LaFTer run ends with three classifiers on the same frozen CLIP: zero-shot CLIP, the stage-1 text
classifier and the adapted model. Self-training can make the adapted model worse than both (its
pseudo-labels reinforce their own mistakes; a class can swallow them all), and a user must never be
served a classifier worse than the free zero-shot one when the evidence says so.

- **With a labelled evaluation split** the most accurate of the three on it is served
  (``evaluate.select_best``), and the label-free decision is reported beside it.
- **Without labels** the decision uses only the unlabeled images:

  1. *dominance*: the adapted model is never served when one class takes far more of its predictions
     than of zero-shot's (``evaluate.detect_collapse``'s dominance rule);
  2. *kept the class names*: the adapted model must agree with zero-shot CLIP beyond chance: Cohen's
     kappa of the two prediction sets (``(p_o - p_e) / (1 - p_e)``, ``p_e`` from the two class
     histograms) above ``MIN_KAPPA``. Raw agreement is no test: a zero-shot teacher biased towards a
     few classes disagrees with a good adapted model on most images (agreement 5-25% in
     bench/quality.py where the adapted model gained 10-25 points). But an adapted model whose
     agreement is at chance level has lost the link between its outputs and the class names (the
     balancing of pseudo-labels can permute weak classes), and in the benchmark those were the runs
     that lost to zero-shot;
  3. otherwise the adapted model is served. When it is not, zero-shot CLIP is served: the free
     baseline that the product promises never to fall below. The text classifier is served only when
     a labelled split shows it is the most accurate (or when there is no zero-shot candidate).
     Without labels nothing tells the two baselines apart reliably: in bench/quality.py (42 runs,
     templates only) the text classifier was below zero-shot in 36, and choosing the baseline whose
     predictions follow the frozen features' clusters best (*cluster consistency*, the earlier rule)
     would have served it in 12, up to 14.8 points below zero-shot; zero-shot as the fallback loses at
     most 2.0 points against the better baseline. Cluster consistency (the chance-corrected share of
     each image's ``k`` nearest neighbours with the same predicted class; 0 for a one-class
     classifier) is still reported for every classifier as a diagnostic.

  Kappa is a weak signal (its range for good and bad runs overlaps); docs/benchmarks.md has the
  record: how often the guard serves the most accurate of the three, and the worst loss.

Pure torch, no service code: the CLI and the worker both call ``evaluate_candidates``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lafter import evaluate
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.predict import AdaptedClassifier
from lafter.views import ImageCache, ViewMaker

GUARD_IMAGES = 2000  # unlabeled images the guard looks at (evenly spaced over the set)
NEIGHBOURS = 10
# The adapted model must agree with zero-shot beyond chance by this much (Cohen's kappa). 0.03 was
# chosen on bench/quality.py seeds 0-2 and failed out of sample on seeds 3-5 (a good model at kappa
# 0.030 was replaced, -10.2 points); 0.015 is the middle of the plateau over all 42 runs (in sample).
MIN_KAPPA = 0.015


@dataclass
class Evaluation:
    served: str  # "lafter" | "text_classifier" | "zero_shot"
    reason: str
    report: dict[str, Any]  # JSON-able: images, diagnostics, collapse, guard, labelled?, selection
    warnings: list[dict[str, Any]] = field(default_factory=list)
    probabilities: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def neighbour_consistency(features: torch.Tensor, predictions: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Chance-corrected share of each image's ``k`` nearest neighbours (cosine) that share its
    predicted class: 1 = labels constant on every neighbourhood and spread over classes, 0 = no better
    than labels drawn at random with the same class shares (a one-class classifier scores 0)."""
    n = features.shape[0]
    if n < 3:
        return 0.0
    k = max(1, min(k, n - 1))
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    sims = f @ f.t()
    sims.fill_diagonal_(-float("inf"))
    idx = sims.topk(k, dim=1).indices
    observed = float((predictions[idx] == predictions.unsqueeze(1)).float().mean())
    shares = torch.bincount(predictions, minlength=int(predictions.max()) + 1).float() / n
    expected = float((shares**2).sum())
    if expected >= 1.0 - 1e-9:
        return 0.0
    return (observed - expected) / (1.0 - expected)


@torch.no_grad()
def base_features(backbone: Backbone, u8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Frozen, unprompted image features (weak view), as the zero-shot classifier sees them."""
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std).to(backbone.device)
    out = []
    for start in range(0, u8.shape[0], batch_size):
        x = views.weak(u8[start : start + batch_size].to(backbone.device))
        with backbone.autocast():
            out.append(backbone.model.encode_image(x).float().cpu())
    return torch.cat(out)


def _is_head_only(model: AdaptedModel) -> bool:
    """A linear head on the base tower's own features (no prompts, no LayerNorm overrides)."""
    return model.prompts is None and not model.layernorms


def _head_probs(features: torch.Tensor, model: AdaptedModel) -> torch.Tensor:
    """``AdaptedClassifier.predict_tensor`` for a head-only model, from precomputed base features."""
    f = torch.nn.functional.normalize(features, dim=-1) if model.normalize_features else features
    return (f @ model.head_weight.float().t()).softmax(dim=-1)


def _spread(n: int, cap: int) -> torch.Tensor:
    if n <= cap:
        return torch.arange(n)
    return torch.linspace(0, n - 1, cap).round().long().unique()


def _warning(code: str, message: str, **data: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **({"data": data} if data else {})}


def kappa(pred_a: torch.Tensor, pred_b: torch.Tensor, num_classes: int) -> float:
    """Cohen's kappa of two label sets: agreement corrected for what their class shares give by chance."""
    n = pred_a.shape[0]
    if n == 0:
        return 0.0
    observed = float((pred_a == pred_b).float().mean())
    pa = torch.bincount(pred_a, minlength=num_classes).float() / n
    pb = torch.bincount(pred_b, minlength=num_classes).float() / n
    expected = float((pa * pb).sum())
    if expected >= 1.0 - 1e-9:
        return 0.0
    return (observed - expected) / (1.0 - expected)


def label_free_choice(
    candidates: Collection[str],
    dominated: bool,
    kappa_with_zero_shot: float | None,
    min_kappa: float = MIN_KAPPA,
) -> tuple[str, str]:
    """The guard's rule (module docstring) for the ``candidates`` kinds, given the adapted model's
    dominance and kappa with zero-shot: (kind served, reason)."""
    baselines = [k for k in ("zero_shot", "text_classifier") if k in candidates]
    fallback = baselines[0] if baselines else None
    served_as = "zero-shot CLIP, the free baseline" if fallback == "zero_shot" else "the text classifier"
    if "lafter" not in candidates:
        assert fallback is not None
        return fallback, f"no adapted model; serving {served_as}"
    if fallback is None:
        return "lafter", "no baseline to compare with"
    if dominated:
        return fallback, f"one class swallowed the adapted model's predictions; serving {served_as}"
    if kappa_with_zero_shot is not None and kappa_with_zero_shot <= min_kappa:
        return fallback, (
            f"the adapted model agrees with zero-shot CLIP no better than chance (kappa "
            f"{kappa_with_zero_shot:.3f} <= {min_kappa}): it has likely lost the link to the class names; "
            f"serving {served_as}"
        )
    shown_kappa = (
        "" if kappa_with_zero_shot is None else f" (kappa with zero-shot {kappa_with_zero_shot:.3f})"
    )
    return "lafter", (f"the adapted model shows no sign of collapse and keeps the class names{shown_kappa}")


def evaluate_candidates(
    backbone: Backbone,
    candidates: Mapping[str, AdaptedModel],
    images: ImageCache,
    eval_images: ImageCache | None = None,
    eval_labels: Sequence[int] | None = None,
    *,
    max_images: int = GUARD_IMAGES,
    min_kappa: float = MIN_KAPPA,
) -> Evaluation:
    """Diagnose the candidates on (up to ``max_images`` of) the unlabeled ``images`` and pick the one to
    serve: by accuracy when a labelled split is given, by the label-free guard otherwise."""
    unknown = set(candidates) - set(evaluate.KINDS)
    if unknown or not candidates:
        raise ValueError(f"candidates must be among {evaluate.KINDS}, got {sorted(candidates)}")
    names = list(next(iter(candidates.values())).class_names)
    sample = images.data[_spread(len(images), max_images)]
    classifiers = {kind: AdaptedClassifier(backbone, m) for kind, m in candidates.items()}
    feats = base_features(backbone, sample)
    # zero-shot and the text classifier are heads on exactly these features: one tower pass serves all
    probs = {
        kind: _head_probs(feats, m) if _is_head_only(m) else classifiers[kind].predict_uint8(sample)
        for kind, m in candidates.items()
    }
    consistency = {kind: neighbour_consistency(feats, p.argmax(1)) for kind, p in probs.items()}
    collapse = (
        evaluate.detect_collapse(probs["lafter"], probs["zero_shot"], names)
        if "lafter" in probs and "zero_shot" in probs
        else None
    )
    dominated = False
    k_zs: float | None = None
    if collapse is not None:
        share_limit = collapse.thresholds["max_share"]
        dominated = (
            collapse.top_share > share_limit
            and collapse.top_share > collapse.zero_shot_top_share + evaluate.DOMINANCE_MARGIN
        )
        k_zs = kappa(probs["lafter"].argmax(1), probs["zero_shot"].argmax(1), len(names))
    guard_kind, guard_reason = label_free_choice(candidates.keys(), dominated, k_zs, min_kappa)
    report: dict[str, Any] = {
        "images": int(sample.shape[0]),
        "diagnostics": evaluate.diagnostics(probs, names),
        "guard": {
            "served": guard_kind,
            "reason": guard_reason,
            "cluster_consistency": {k: round(v, 4) for k, v in consistency.items()},
            "neighbours": NEIGHBOURS,
            "dominated": dominated,
            "kappa_with_zero_shot": None if k_zs is None else round(k_zs, 4),
            "min_kappa": min_kappa,
        },
    }
    if collapse is not None:
        report["collapse"] = collapse.as_dict()
    warnings: list[dict[str, Any]] = []
    if collapse is not None and dominated:
        warnings.append(
            _warning(
                "collapse_suspected",
                "possible self-training collapse: " + collapse.reasons[0],
                **collapse.as_dict(),
            )
        )

    labelled = eval_images is not None and eval_labels is not None and len(eval_labels) > 0
    if labelled:
        assert eval_images is not None and eval_labels is not None
        if len(eval_images) != len(eval_labels):
            raise ValueError("eval_images and eval_labels differ in length")
        eval_probs = {kind: clf.predict_uint8(eval_images.data) for kind, clf in classifiers.items()}
        accuracies = {kind: evaluate.accuracy(p, list(eval_labels)) for kind, p in eval_probs.items()}
        selection = evaluate.select_best(accuracies, len(eval_labels))
        served, reason = selection.kind, selection.reason
        report["labelled"] = {
            "images": len(eval_labels),
            "accuracy": {k: round(v, 4) for k, v in accuracies.items()},
            "guard_would_serve": guard_kind,
        }
        if len(names) <= evaluate.MAX_CONFUSION_CLASSES:
            # rows: true class, columns: predicted class, both in the order of ``class_names``
            report["labelled"]["confusion"] = {
                kind: evaluate.confusion_matrix(p, list(eval_labels), len(names))
                for kind, p in eval_probs.items()
            }
        else:
            report["labelled"]["confusion_omitted"] = "too many classes"
        if selection.worse_than_baseline:
            warnings.append(_warning("adaptation_worse", reason, served=served))
    else:
        served, reason = guard_kind, "no labelled evaluation split; label-free guard: " + guard_reason
        if served != "lafter" and "lafter" in candidates:
            warnings.append(
                _warning(
                    "adaptation_not_served",
                    f"serving {served}, not the adapted model: {guard_reason}. Upload a small labelled "
                    "evaluation split to decide on accuracy instead",
                    served=served,
                )
            )
    report["selection"] = {"served": served, "reason": reason}
    return Evaluation(served=served, reason=reason, report=report, warnings=warnings, probabilities=probs)
