"""The adapted-model artifact: base spec + class names + only the tuned tensors, in safetensors.

Tensor names: ``prompts`` [k, width], ``ln.<image-tower module path>.weight|bias``, ``head.weight``
[C, embed_dim]. The header (safetensors metadata) carries the base spec, class names, kind, whether
features are L2-normalised before the head, free-form metadata, and a SHA-256 over the header and every
tensor's name, dtype, shape and bytes, checked on load.

Three kinds share the format, so a service can always serve the best of them:
``lafter`` (prompts + LayerNorms + head on raw features), ``text_classifier`` (stage-1 head on
normalised features) and ``zero_shot`` (class text embeddings x logit scale on normalised features).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lafter.errors import ArtifactMismatchError, CorruptArtifactError
from lafter.prompted import HEAD, LN_PREFIX, PROMPTS
from lafter.templates import IMAGENET_TEMPLATES

if TYPE_CHECKING:
    from lafter.backbone import Backbone

FORMAT_VERSION = 1
# CLIP's zero-shot prompt ensemble for the baseline: the 8 hand-made templates of method.md.
ZERO_SHOT_TEMPLATES = IMAGENET_TEMPLATES
Kind = Literal["lafter", "text_classifier", "zero_shot"]


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class AdaptedModel:
    base_spec: str
    class_names: list[str]
    tensors: dict[str, torch.Tensor]
    kind: Kind = "lafter"
    normalize_features: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_text_head(
        cls,
        base_spec: str,
        class_names: list[str],
        head: torch.nn.Linear,
        metadata: dict[str, Any] | None = None,
    ) -> AdaptedModel:
        return cls(
            base_spec=base_spec,
            class_names=list(class_names),
            tensors={HEAD: head.weight.detach().float().cpu().clone()},
            kind="text_classifier",
            normalize_features=True,
            metadata=dict(metadata or {}),
        )

    @classmethod
    def zero_shot(
        cls, backbone: Backbone, class_names: list[str], templates: list[str] | None = None
    ) -> AdaptedModel:
        """CLIP's zero-shot classifier as an artifact: mean template embedding per class."""
        templates = templates or list(ZERO_SHOT_TEMPLATES)
        rows = []
        for name in class_names:
            phrase = name.replace("_", " ").strip()
            emb = backbone.encode_text([t.format(phrase) for t in templates])
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        weight = torch.stack(rows) * backbone.logit_scale
        return cls(
            base_spec=backbone.spec,
            class_names=list(class_names),
            tensors={HEAD: weight},
            kind="zero_shot",
            normalize_features=True,
            metadata={"templates": templates},
        )

    # --- views of the tensors ---------------------------------------------------------------
    @property
    def prompts(self) -> torch.Tensor | None:
        return self.tensors.get(PROMPTS)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tensors[HEAD]

    @property
    def layernorms(self) -> dict[str, torch.Tensor]:
        return {k[len(LN_PREFIX) :]: v for k, v in self.tensors.items() if k.startswith(LN_PREFIX)}

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    # --- serialisation ------------------------------------------------------------------------
    def _header(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "base_spec": self.base_spec,
                "class_names": self.class_names,
                "kind": self.kind,
                "normalize_features": self.normalize_features,
                "metadata": self.metadata,
            },
            sort_keys=True,
        )

    @property
    def checksum(self) -> str:
        return _digest(self._header(), self.tensors)

    def to_bytes(self) -> bytes:
        header = self._header()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return bytes(st_save(tensors, metadata={"lafter": header, "sha256": _digest(header, tensors)}))

    @classmethod
    def from_bytes(cls, data: bytes) -> AdaptedModel:
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptArtifactError(f"not a readable adapted-model artifact: {exc}") from exc
        if "lafter" not in meta or "sha256" not in meta:
            raise CorruptArtifactError("safetensors file without a LaFTer header (not an adapted model)")
        if _digest(meta["lafter"], tensors) != meta["sha256"]:
            raise CorruptArtifactError(
                "adapted-model checksum mismatch: the artifact is corrupt or was edited"
            )
        header = json.loads(meta["lafter"])
        if header.get("format") != FORMAT_VERSION:
            raise CorruptArtifactError(f"unsupported artifact format {header.get('format')!r}")
        model = cls(
            base_spec=header["base_spec"],
            class_names=list(header["class_names"]),
            tensors=tensors,
            kind=header["kind"],
            normalize_features=bool(header["normalize_features"]),
            metadata=header.get("metadata", {}),
        )
        model.validate_self()
        return model

    def save(self, path: str | Path) -> str:
        Path(path).write_bytes(self.to_bytes())
        return self.checksum

    @classmethod
    def load(cls, path: str | Path) -> AdaptedModel:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CorruptArtifactError(f"cannot read artifact {str(path)!r}: {exc}") from exc
        return cls.from_bytes(data)

    # --- checks -------------------------------------------------------------------------------
    def validate_self(self) -> None:
        if HEAD not in self.tensors:
            raise CorruptArtifactError("artifact has no head.weight")
        if self.head_weight.shape[0] != len(self.class_names):
            raise CorruptArtifactError(
                f"head has {self.head_weight.shape[0]} rows but the artifact names {len(self.class_names)} classes"
            )

    def check_compatible(self, backbone: Backbone, strict_spec: bool = True) -> None:
        """Refuse to apply this delta to a base it was not made for (wrong spec or shapes)."""
        if strict_spec and backbone.spec != self.base_spec:
            raise ArtifactMismatchError(
                f"artifact was adapted from {self.base_spec!r} but the loaded base model is {backbone.spec!r}"
            )
        if self.head_weight.shape[1] != backbone.embed_dim:
            raise ArtifactMismatchError(
                f"head expects {self.head_weight.shape[1]}-d features; {backbone.spec!r} gives {backbone.embed_dim}"
            )
        prompts = self.prompts
        if prompts is not None and prompts.shape[-1] != backbone.width:
            raise ArtifactMismatchError(
                f"prompts are {prompts.shape[-1]} wide; the image tower of {backbone.spec!r} is {backbone.width}"
            )
        params = dict(backbone.visual.named_parameters())
        for name, t in self.layernorms.items():
            if name not in params or params[name].shape != t.shape:
                raise ArtifactMismatchError(
                    f"LayerNorm tensor {name!r} does not fit the image tower of {backbone.spec!r}"
                )


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("bad safetensors header length")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    meta = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in meta.items()}
