"""Stage 1: the text-only classifier."""

from __future__ import annotations

import pytest
import torch

from lafter.errors import Cancelled, InvalidInputError
from lafter.text_classifier import TextClassifierConfig, _projected_step, train_text_classifier


def _clusters(n_per: int, classes: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = torch.nn.functional.normalize(
        centers[y] + 0.3 * torch.randn(len(y), dim, generator=g) / dim**0.5, dim=-1
    )
    return x, y


def dense_grad(
    w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float, g: torch.Generator
) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    noisy = x + s * torch.randn(x.shape, generator=g)
    torch.nn.functional.cross_entropy(noisy @ w.t(), y, label_smoothing=0.1).backward()
    assert w.grad is not None
    return w.grad


def test_projected_noise_gives_the_reference_gradient_distribution():
    # same W, x, y: the gradient's mean and per-entry spread must match the dense (reference) sampling
    torch.manual_seed(0)
    x, y = _clusters(8, 4, 32)
    w = 0.5 * torch.randn(4, 32)
    cfg = TextClassifierConfig(noise_std=0.3)
    gd, gp = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    dense = torch.stack([dense_grad(w, x, y, 0.3, gd) for _ in range(1500)])
    proj = []
    for _ in range(1500):
        p = w.clone()
        _projected_step(p, x, y, cfg, gp)
        assert p.grad is not None
        proj.append(p.grad)
    projected = torch.stack(proj)
    scale = dense.std(0).mean()
    assert (dense.mean(0) - projected.mean(0)).abs().max() < 0.15 * scale
    ratio = projected.std(0) / dense.std(0)
    assert 0.9 < ratio.median() < 1.1 and ratio.min() > 0.8 and ratio.max() < 1.25
    # and it is not trivially the noiseless gradient
    assert projected.std(0).mean() > 0.2 * scale


@pytest.mark.parametrize("noise", ["dense", "projected"])
def test_learns_separable_text_and_transfers_to_noisy_inputs(noise):
    x, y = _clusters(20, 5, 64)
    res = train_text_classifier(x, y, 5, TextClassifierConfig(noise_sampling=noise), seed=0)
    assert res.steps == 400 and res.resolved["noise_sampling"] == noise
    assert res.train_accuracy == 1.0
    assert res.head.bias is None and res.head.weight.shape == (5, 64)
    shifted = torch.nn.functional.normalize(x + 0.1 * torch.randn(x.shape), dim=-1)
    assert (res.head(shifted).argmax(1) == y).float().mean() > 0.9


def test_seeded_and_zeroshot_init():
    x, y = _clusters(5, 3, 16)
    a = train_text_classifier(x, y, 3, TextClassifierConfig(steps=5), seed=7).head.weight
    b = train_text_classifier(x, y, 3, TextClassifierConfig(steps=5), seed=7).head.weight
    assert torch.equal(a, b)
    zs = train_text_classifier(x, y, 3, TextClassifierConfig(steps=1, learning_rate=0.0, init="zeroshot"))
    expected = torch.nn.functional.normalize(torch.stack([x[y == c].mean(0) for c in range(3)]), dim=-1)
    assert torch.allclose(zs.head.weight, expected, atol=1e-6)


def test_bad_input_and_cancel():
    x, y = _clusters(5, 3, 16)
    with pytest.raises(InvalidInputError):
        train_text_classifier(x, y[:-1], 3)
    with pytest.raises(InvalidInputError):
        train_text_classifier(x, y, 2)
    with pytest.raises(Cancelled):
        train_text_classifier(x, y, 3, should_cancel=lambda: True)
