"""Backbone loading: an open_clip model from a spec string, on the right device.

A spec names an architecture and where its weights come from, separated by ``::``:

- ``ViT-B-32::openai``            open_clip architecture + pretrained tag (downloaded and cached by open_clip)
- ``ViT-B-32::/ckpt/model.pt``    open_clip architecture + a local checkpoint file
- ``/cfg/tiny.json::/ckpt/x.pt``  a custom architecture (open_clip model-config JSON) + a local checkpoint
- ``ViT-B-32::random``            random weights (tests and speed benchmarks)

Only ViT image towers are accepted: LaFTer's visual prompts are extra tokens in the transformer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transformer import VisionTransformer

from lafter.device import resolve_device, resolve_precision
from lafter.errors import InvalidModelSpecError, UnsupportedArchitectureError, WeightsUnavailableError

log = logging.getLogger(__name__)

RANDOM = "random"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``arch`` is an open_clip name or None for a custom config file."""

    raw: str
    arch: str | None
    config_path: Path | None
    pretrained: str  # a tag, a checkpoint path, or "random"

    @property
    def is_random(self) -> bool:
        return self.pretrained == RANDOM

    @property
    def checkpoint_path(self) -> Path | None:
        if self.is_random or self._is_tag:
            return None
        return Path(self.pretrained)

    @property
    def _is_tag(self) -> bool:
        return self.arch is not None and get_pretrained_cfg(self.arch, self.pretrained) != {}

    @property
    def name(self) -> str:
        return self.arch if self.arch is not None else str(self.config_path)


def parse_spec(spec: str) -> ModelSpec:
    """Validate a spec without loading weights (cheap: used by the API before queueing a job)."""
    if not isinstance(spec, str) or "::" not in spec:
        raise InvalidModelSpecError(
            f"model spec {spec!r} must look like ARCH::PRETRAINED_TAG (e.g. 'ViT-B-32::openai'), "
            "ARCH::/path/to/checkpoint.pt, /path/to/config.json::/path/to/checkpoint, or ARCH::random"
        )
    left, right = (part.strip() for part in spec.split("::", 1))
    if not left or not right:
        raise InvalidModelSpecError(f"model spec {spec!r} has an empty architecture or weights part")
    config_path: Path | None = None
    arch: str | None = None
    if left.endswith(".json"):
        config_path = Path(left)
        if not config_path.is_file():
            raise InvalidModelSpecError(f"model config file {left!r} of spec {spec!r} does not exist")
    else:
        arch = left.replace("/", "-")
        if open_clip.get_model_config(arch) is None:
            raise InvalidModelSpecError(
                f"unknown architecture {left!r} in spec {spec!r}; known ViT architectures include "
                f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT-B'))[:300]}..."
            )
    if right != RANDOM:
        is_tag = arch is not None and get_pretrained_cfg(arch, right) != {}
        if not is_tag:
            looks_like_path = os.sep in right or right.endswith(CHECKPOINT_SUFFIXES)
            if not looks_like_path:
                tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
                raise InvalidModelSpecError(
                    f"{right!r} in spec {spec!r} is neither a pretrained tag of {left!r} "
                    f"(known: {', '.join(tags) or 'none'}) nor a checkpoint path"
                )
            if not Path(right).is_file():
                raise WeightsUnavailableError(
                    f"checkpoint file {right!r} of spec {spec!r} does not exist or is not a file"
                )
    return ModelSpec(raw=spec, arch=arch, config_path=config_path, pretrained=right)


@dataclass
class Backbone:
    """A loaded CLIP model plus what the method needs to know about it (all read from the model)."""

    spec: str
    model: Any  # open_clip.CLIP (or CustomTextCLIP)
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    width: int
    patch_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual  # type: ignore[no-any-return]

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def encode_text(self, sentences: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, float32 on the CPU. Long sentences are truncated
        by the tokenizer (method.md: truncated, not rejected)."""
        out = []
        for start in range(0, len(sentences), batch_size):
            tokens = self.tokenizer(sentences[start : start + batch_size]).to(self.device)
            with self.autocast():
                emb = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(out)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidModelSpecError(f"model config {str(path)!r} is not readable JSON: {exc}") from exc
    if "model_cfg" in cfg:  # open_clip's hub/local-dir layout wraps the model config
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise InvalidModelSpecError(
            f"model config {str(path)!r} must have 'embed_dim', 'vision_cfg' and 'text_cfg' (open_clip format)"
        )
    return cfg


def _check_vit(spec: str, model_cfg: dict[str, Any]) -> None:
    vision = model_cfg.get("vision_cfg", {})
    layers = vision.get("layers")
    if "timm_model_name" in vision or not isinstance(layers, int):
        kind = vision.get("timm_model_name") or "ResNet"
        raise UnsupportedArchitectureError(
            f"{spec!r} has a {kind} image tower; LaFTer needs an open_clip ViT image tower "
            "(its visual prompts are transformer tokens). Use e.g. 'ViT-B-32::openai'."
        )


def _weights_hint(spec: ModelSpec) -> str:
    arch = spec.arch or str(spec.config_path)
    return (
        f"To run offline, download the checkpoint elsewhere and point at it: '{arch}::/path/to/checkpoint.pt' "
        "(or set HF_HOME / cache_dir to a folder where open_clip has already cached it)."
    )


def load_backbone(
    spec: str,
    device: str | torch.device = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Load a CLIP model for LaFTer. The model is put in eval mode and frozen (requires_grad False):
    the method never changes base weights, it only learns a delta on top of them."""
    parsed = parse_spec(spec)
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    if parsed.config_path is not None:
        model_cfg = _read_config(parsed.config_path)
    else:
        assert parsed.arch is not None
        model_cfg = open_clip.get_model_config(parsed.arch) or {}
    _check_vit(spec, model_cfg)

    try:
        # random weights are seeded, so every process that loads "X::random" gets the same model
        # (an API and a worker must agree, and caches keyed by spec must stay valid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _build(parsed, model_cfg, cache_dir)
    except (UnsupportedArchitectureError, InvalidModelSpecError):
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
        raise WeightsUnavailableError(
            f"could not load the weights of {spec!r}: {type(exc).__name__}: {str(exc)[:400]}. {_weights_hint(parsed)}"
        ) from exc
    return _wrap(spec, parsed, model, model_cfg, dev, amp)


def _build(parsed: ModelSpec, model_cfg: dict[str, Any], cache_dir: str | None) -> Any:
    if parsed.config_path is not None:
        model = _create_from_config(model_cfg)
        if not parsed.is_random:
            open_clip.load_checkpoint(model, str(parsed.pretrained))
        return model
    assert parsed.arch is not None
    tag_cfg = get_pretrained_cfg(parsed.arch, parsed.pretrained) if not parsed.is_random else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)
    return open_clip.create_model(
        parsed.arch,
        pretrained=None if parsed.is_random else parsed.pretrained,
        force_quick_gelu=quick_gelu,
        cache_dir=cache_dir,
        pretrained_text=False,
    )


def _wrap(
    spec: str,
    parsed: ModelSpec,
    model: Any,
    model_cfg: dict[str, Any],
    dev: torch.device,
    amp: torch.dtype | None,
) -> Backbone:
    if not isinstance(model.visual, VisionTransformer):
        raise UnsupportedArchitectureError(
            f"{spec!r} built a {type(model.visual).__name__} image tower; LaFTer needs a ViT"
        )
    if model.visual.attn_pool is not None:
        raise UnsupportedArchitectureError(
            f"{spec!r} uses attentional pooling, which LaFTer does not support"
        )

    model.eval().requires_grad_(False).to(dev)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(pp.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", OPENAI_DATASET_STD))
    image_size = model.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, tuple | list) else image_size)
    patch = model.visual.patch_size
    patch = int(patch[0] if isinstance(patch, tuple | list) else patch)
    tokenizer = open_clip.get_tokenizer(
        parsed.arch or "ViT-B-32", context_length=int(model_cfg["text_cfg"].get("context_length", 77))
    )
    backbone = Backbone(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        image_size=image_size,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        embed_dim=int(model.visual.output_dim),
        width=int(model.visual.class_embedding.shape[-1]),
        patch_size=patch,
        device=dev,
        amp_dtype=amp,
        info={"parameters": sum(p.numel() for p in model.parameters())},
    )
    log.info(
        "loaded %s on %s (%s), image tower width %d, embed dim %d",
        spec,
        dev,
        "fp32" if amp is None else str(amp).replace("torch.", ""),
        backbone.width,
        backbone.embed_dim,
    )
    return backbone


def _create_from_config(model_cfg: dict[str, Any]) -> torch.nn.Module:
    cfg = dict(model_cfg)
    cfg.pop("custom_text", None)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        return open_clip.CustomTextCLIP(**cfg)
    return open_clip.CLIP(**cfg)


def list_base_models(local_dirs: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """Specs this deployment can use: open_clip's ViT pretrained tags, plus local models found in
    ``local_dirs`` (each ``NAME.json`` config beside a ``NAME.<checkpoint suffix>`` file, or a
    checkpoint named after a built-in architecture, e.g. ``ViT-B-32.pt``)."""
    out: list[dict[str, Any]] = []
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.get_model_config(arch) or {}
        vision = cfg.get("vision_cfg", {})
        if "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
            continue
        out.append({"spec": f"{arch}::{tag}", "arch": arch, "pretrained": tag, "source": "open_clip"})
    for folder in local_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for ckpt in sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES):
            config = ckpt.with_suffix(".json")
            if config.is_file():
                spec = f"{config}::{ckpt}"
                arch = ckpt.stem
            elif open_clip.get_model_config(ckpt.stem) is not None:
                spec = f"{ckpt.stem}::{ckpt}"
                arch = ckpt.stem
            else:
                continue
            out.append({"spec": spec, "arch": arch, "pretrained": str(ckpt), "source": "local"})
    return out
