"""``lafter.evaluate``: diagnostics, collapse detection and the best-of-three rule."""

from __future__ import annotations

import pytest
import torch

from lafter import evaluate


def one_hot(preds: list[int], c: int, confidence: float = 0.9) -> torch.Tensor:
    probs = torch.full((len(preds), c), (1 - confidence) / (c - 1))
    probs[torch.arange(len(preds)), torch.tensor(preds)] = confidence
    return probs


def test_histogram_agreement_confidence_accuracy() -> None:
    a = one_hot([0, 1, 1, 2], 3, 0.8)
    b = one_hot([0, 1, 2, 2], 3)
    assert evaluate.pseudo_label_histogram(a) == [1, 2, 1]
    assert evaluate.agreement(a, b) == pytest.approx(0.75)
    assert evaluate.mean_confidence(a) == pytest.approx(0.8)
    assert evaluate.accuracy(a, [0, 1, 2, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        evaluate.agreement(a, b[:2])


def test_thresholds_depend_on_class_count() -> None:
    assert evaluate.dominance_threshold(2) == pytest.approx(0.9)
    assert evaluate.dominance_threshold(10) == pytest.approx(0.5)
    assert evaluate.agreement_floor(2) == pytest.approx(0.5)
    assert evaluate.agreement_floor(10) == pytest.approx(0.3)


def test_one_class_swallowing_the_labels_is_a_collapse() -> None:
    names = [f"c{i}" for i in range(5)]
    zero_shot = one_hot([0, 1, 2, 3, 4] * 4, 5)
    adapted = one_hot([2] * 20, 5)
    report = evaluate.detect_collapse(adapted, zero_shot, names)
    assert report.collapsed and report.top_class == "c2" and report.top_share == 1.0
    assert any("takes 100%" in r for r in report.reasons)
    assert any("agreement" in r for r in report.reasons)


def test_a_naturally_imbalanced_set_is_not_a_collapse() -> None:
    names = ["common", "rare"]
    preds = [0] * 19 + [1]  # zero-shot already sees 95% of one class
    report = evaluate.detect_collapse(one_hot(preds, 2), one_hot(preds, 2), names)
    assert not report.collapsed and report.reasons == []


def test_healthy_adaptation_is_not_flagged() -> None:
    names = [f"c{i}" for i in range(4)]
    zero_shot = one_hot([0, 1, 2, 3, 0, 1, 2, 3], 4)
    adapted = one_hot([0, 1, 2, 3, 0, 1, 3, 3], 4)
    assert not evaluate.detect_collapse(adapted, zero_shot, names).collapsed


def test_select_best_prefers_the_most_accurate_and_says_why() -> None:
    worse = evaluate.select_best({"zero_shot": 0.8, "text_classifier": 0.7, "lafter": 0.6}, 50)
    assert worse.kind == "zero_shot" and worse.worse_than_baseline
    assert "50 labelled" in worse.reason and "instead of a worse model" in worse.reason
    better = evaluate.select_best({"zero_shot": 0.5, "text_classifier": 0.7, "lafter": 0.9}, 10)
    assert better.kind == "lafter" and not better.worse_than_baseline


def test_select_best_breaks_ties_towards_the_adapted_model() -> None:
    assert evaluate.select_best({"zero_shot": 0.7, "text_classifier": 0.7, "lafter": 0.7}, 5).kind == "lafter"
    assert evaluate.select_best({"zero_shot": 0.7, "text_classifier": 0.7}, 5).kind == "text_classifier"
    with pytest.raises(ValueError):
        evaluate.select_best({"bogus": 1.0}, 1)


def test_diagnostics_cover_every_classifier() -> None:
    names = ["a", "b"]
    out = evaluate.diagnostics({"zero_shot": one_hot([0, 1], 2), "lafter": one_hot([0, 0], 2)}, names)
    assert out["lafter"]["pseudo_label_histogram"] == {"a": 2, "b": 0}
    assert out["lafter"]["agreement_with_zero_shot"] == 0.5
    assert "agreement_with_zero_shot" not in out["zero_shot"]


def test_confusion_matrix_rows_are_true_classes_columns_predictions() -> None:
    # labels   0 0 0 1 1 2
    # predicted 0 1 0 1 2 2  -> class 0: two right, one taken for 1; class 1: one right, one for 2
    probs = one_hot([0, 1, 0, 1, 2, 2], 3)
    matrix = evaluate.confusion_matrix(probs, [0, 0, 0, 1, 1, 2], 3)
    assert matrix == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert [sum(row) for row in matrix] == [3, 2, 1]
    # the diagonal over the total is the accuracy
    assert sum(matrix[i][i] for i in range(3)) / 6 == pytest.approx(
        evaluate.accuracy(probs, [0, 0, 0, 1, 1, 2])
    )
    assert evaluate.confusion_matrix(one_hot([1], 4), [3], 4) == [[0] * 4, [0] * 4, [0] * 4, [0, 1, 0, 0]]
    with pytest.raises(ValueError):
        evaluate.confusion_matrix(probs, [0, 1], 3)
    with pytest.raises(ValueError):
        evaluate.confusion_matrix(probs, [0, 0, 0, 1, 1, 3], 3)
