"""Stage 1: a text-only classifier trained on CLIP text embeddings of the class descriptions.

One linear layer (embed_dim -> C, no bias). Every step sees every sentence (full batch) plus fresh
Gaussian noise of std 0.1 per dimension, not re-normalised: the noise is what lets a classifier trained
on text transfer to image embeddings. Cross-entropy with label smoothing 0.1, AdamW lr 5e-4, weight
decay 0.01, constant lr, 400 steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from lafter.errors import InvalidInputError
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel

STAGE = "training_text_classifier"
AUTO_TEXT_STEPS = 400


@dataclass
class TextClassifierConfig:
    steps: int | Literal["auto"] = "auto"
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    noise_std: float = 0.1
    label_smoothing: float = 0.1
    # "default": PyTorch's Linear init (the reference). "zeroshot": rows start at the class-mean text
    # embedding, an option to offer and measure.
    init: Literal["default", "zeroshot"] = "default"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # How the per-step Gaussian noise is drawn. "dense": an N x D noise matrix every step, as the
    # reference does. "projected": the same distribution of loss and gradient, drawing only N x C + C x D
    # numbers (see _projected_step). "auto": projected when C <= D / 2, where it saves most of the time.
    noise_sampling: Literal["auto", "dense", "projected"] = "auto"
    log_every: int = 50

    def resolve_steps(self, num_sentences: int) -> int:
        """'auto' is the method's 400 full-batch steps: each step already sees every sentence, so the
        count does not need to grow with the data."""
        del num_sentences
        return AUTO_TEXT_STEPS if self.steps == "auto" else int(self.steps)


@dataclass
class TextClassifierResult:
    head: nn.Linear
    steps: int
    final_loss: float
    train_accuracy: float
    seconds: float
    resolved: dict[str, object]


def train_text_classifier(
    embeddings: torch.Tensor,
    labels: torch.Tensor | list[int],
    num_classes: int,
    config: TextClassifierConfig | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> TextClassifierResult:
    config = config or TextClassifierConfig()
    y = torch.as_tensor(labels, dtype=torch.long)
    if embeddings.ndim != 2 or embeddings.shape[0] != y.shape[0] or y.numel() == 0:
        raise InvalidInputError("embeddings must be [N, D] with one label per row and N > 0")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise InvalidInputError("labels out of range for the number of classes")
    dev = torch.device(device) if device is not None else embeddings.device
    x = embeddings.to(dev, torch.float32)
    y = y.to(dev)
    steps = config.resolve_steps(x.shape[0])
    projected = config.noise_sampling == "projected" or (
        config.noise_sampling == "auto" and 2 * num_classes <= x.shape[1]
    )
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and dev.type == "cuda")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes, bias=False)
    if config.init == "zeroshot":
        with torch.no_grad():
            for c in range(num_classes):
                head.weight[c] = nn.functional.normalize(x[y == c].mean(0), dim=0).cpu()
    else:
        bound = 1.0 / x.shape[1] ** 0.5  # PyTorch's default Linear init, drawn from our seeded generator
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=gen)
    head = head.to(dev)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    start = time.perf_counter()
    loss = torch.zeros((), device=dev)
    for step in range(1, steps + 1):
        check_cancel(should_cancel, STAGE, step - 1)
        if projected:
            loss = _projected_step(head.weight, x, y, config, noise_gen)
        else:
            noisy = x + config.noise_std * torch.randn(x.shape, device=dev, generator=noise_gen)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = head(noisy)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if progress is not None and (step % config.log_every == 0 or step == steps):
            progress(ProgressEvent(STAGE, step, steps, {"loss": float(loss.item())}))
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean().item())
    head = head.cpu().requires_grad_(False)
    return TextClassifierResult(
        head=head,
        steps=steps,
        final_loss=float(loss.item()),
        train_accuracy=acc,
        seconds=time.perf_counter() - start,
        resolved={**asdict(config), "steps": steps, "noise_sampling": "projected" if projected else "dense"},
    )


def _psd_sqrt_factor(m: torch.Tensor) -> torch.Tensor:
    """A factor L with L @ L.T == m for a symmetric PSD matrix (Cholesky, eigen fallback if singular)."""
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return chol
    vals, vecs = torch.linalg.eigh(m)
    return vecs * vals.clamp_min(0).sqrt()


def _projected_step(
    weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, config: TextClassifierConfig, gen: torch.Generator
) -> torch.Tensor:
    """One step of ``CE((x + s*n) W^T, y)`` with n ~ N(0, I) per row, without drawing the N x D noise.

    The loss sees the noise only through ``s * n W^T``, whose rows are N(0, s^2 W W^T): draw that
    directly (N x C numbers). The gradient ``G^T (x + s*n)`` splits n into its part in W's row space,
    fixed by the logit noise already drawn, and an orthogonal part independent of everything else,
    whose contribution ``G^T n_perp`` is matrix-normal MN(0, G^T G, I - P): drawn with C x D numbers.
    Loss and gradient therefore have exactly the reference's distribution at every step. Sets
    ``weight.grad`` and returns the loss.
    """
    s = config.noise_std
    w = weight.detach()
    c = w.shape[0]
    gram = w @ w.t()  # C x C
    eye = torch.eye(c, device=w.device, dtype=w.dtype)
    gram_inv = torch.linalg.inv(gram + 1e-10 * eye)
    e = torch.randn((x.shape[0], c), device=w.device, generator=gen)
    logit_noise = s * (e @ _psd_sqrt_factor(gram).t())  # rows ~ N(0, s^2 W W^T)
    logits = (x @ w.t() + logit_noise).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    (g,) = torch.autograd.grad(loss, logits)  # N x C
    # s * n_par = logit_noise (W W^T)^-1 W ; its gradient term is G^T of that
    grad = g.t() @ x + (g.t() @ logit_noise) @ gram_inv @ w
    z = torch.randn((c, w.shape[1]), device=w.device, generator=gen)
    z_perp = z - ((z @ w.t()) @ gram_inv) @ w  # Z (I - P)
    grad += s * (_psd_sqrt_factor(g.t() @ g) @ z_perp)
    weight.grad = grad
    return loss.detach()
