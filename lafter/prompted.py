"""The prompted image tower and the trainable set.

The base model is never modified. The tuned LayerNorm affines are *overrides* applied with
``torch.func.functional_call``, and the prompts are passed in as a tensor, so one loaded base model
serves training, the teacher, and any number of adapted models at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

PROMPTS = "prompts"
HEAD = "head.weight"
LN_PREFIX = "ln."  # tensor names in an artifact: "ln.<module path>.weight|bias"


class _PromptedForward(nn.Module):
    """Wraps an open_clip VisionTransformer with a forward that can insert prompt tokens.

    Tokens are ``[CLS, P1..Pk, patch_1..patch_n]``: inserted after the patch embedding, class token,
    positional embedding and ``ln_pre``, with no positional embedding of their own (shallow prompts).
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        v: Any = self.visual  # an open_clip VisionTransformer; its helpers are not typed
        x = v._embeds(x)
        if prompts is not None:
            p = prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = v.transformer(x)
        pooled, _tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled  # type: ignore[no-any-return]


def layernorm_names(visual: nn.Module) -> list[str]:
    """Names of the weight and bias of every LayerNorm of the image tower, selected by module type
    (never by name substring), in module order: ``ln_pre``, each block's two, ``ln_post``."""
    names: list[str] = []
    for mod_name, module in visual.named_modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            names.extend(f"{mod_name}.{p}" for p in ("weight", "bias") if getattr(module, p) is not None)
    return names


def prompt_init_bound(width: int) -> float:
    """Prompts start uniform(-v, v) with v = sqrt(6 / (3 * 16 * 16 + width)), the reference's
    formula (16 x 16 whatever the patch size): 0.0625 for ViT-B/32's width 768."""
    return math.sqrt(6.0 / float(3 * 16 * 16 + width))


class PromptedTower:
    """Functional view of the base image tower plus a delta (prompts, LayerNorm affines).

    ``ln`` maps ``visual`` module paths (``"ln_pre.weight"``, ``"transformer.resblocks.0.ln_1.bias"``...)
    to override tensors; an empty dict means the base's own LayerNorms.
    """

    def __init__(self, visual: nn.Module) -> None:
        self.module = _PromptedForward(visual)
        self.visual = visual
        self.ln_names = layernorm_names(visual)
        self._ln_set = frozenset(self.ln_names)

    def base_layernorm_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.visual.named_parameters())
        return {name: params[name].detach().clone() for name in self.ln_names}

    def __call__(
        self,
        x: torch.Tensor,
        prompts: torch.Tensor | None,
        ln: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if not ln:
            return self.module(x, prompts)  # type: ignore[no-any-return]
        unknown = ln.keys() - self._ln_set
        if unknown:  # functional_call would silently ignore them
            raise KeyError(f"not LayerNorm parameters of this image tower: {sorted(unknown)[:5]}")
        overrides = {f"visual.{name}": t for name, t in ln.items()}
        # strict=False: only the LayerNorm affines are overridden, every other tensor is the base's own
        return functional_call(self.module, overrides, (x, prompts), strict=False)  # type: ignore[no-any-return]
