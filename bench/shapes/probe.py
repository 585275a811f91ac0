"""Linear probe: multinomial logistic regression on frozen features (full batch, L-BFGS)."""

from __future__ import annotations

import torch


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor | list[int],
    test_feats: torch.Tensor,
    test_labels: torch.Tensor | list[int],
    weight_decay: float = 1e-3,
    max_iter: int = 300,
) -> float:
    """Accuracy on ``test_feats`` of a logistic regression fit on ``train_feats``.

    Features are L2-normalised, then standardised with the training mean and std (an affine change
    that a linear model absorbs; it only conditions the problem). ``weight_decay`` is an L2 penalty on
    the weights (not the bias), scaled per sample."""
    y_tr = torch.as_tensor(train_labels, dtype=torch.long)
    y_te = torch.as_tensor(test_labels, dtype=torch.long)
    x_tr = torch.nn.functional.normalize(train_feats.detach().double(), dim=-1)
    x_te = torch.nn.functional.normalize(test_feats.detach().double(), dim=-1)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    n_classes = int(max(int(y_tr.max()), int(y_te.max())) + 1)
    w = torch.zeros(x_tr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_tr @ w + b, y_tr) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_te @ w + b).argmax(-1)
    return float((pred == y_te).double().mean())
