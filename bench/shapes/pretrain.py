"""Pretrain the world's tiny CLIP contrastively (CPU, a few minutes).

    python -m bench.shapes.pretrain --out bench/out/shapes --steps 1500 --seed 0

Writes ``OUT/model_config.json`` (an open_clip model config) and ``OUT/checkpoint.pt`` (a state dict),
so the model loads in lafter as ``OUT/model_config.json::OUT/checkpoint.pt``, plus ``OUT/report.json``
with zero-shot accuracies on held-out photo and sketch images and a linear probe on sketch features.

Loss: symmetric InfoNCE where identical captions count as positives of each other (captions repeat
across a batch), with open_clip's learnable temperature, AdamW, linear warm-up then cosine decay.
Training images get a light RandomResizedCrop(0.5-1) + flip, as CLIP's training does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import numpy as np
import open_clip
import torch
from PIL import Image

from bench.shapes.probe import linear_probe
from bench.shapes.world import CLASSES, SIZE, make_split
from lafter.templates import IMAGENET_TEMPLATES

CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TEMPLATES = list(IMAGENET_TEMPLATES)  # CLIP's zero-shot ensemble, as the baseline uses it


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def contrastive_loss(model: Any, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    f_img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    f_txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * f_img @ f_txt.t()
    same = (tokens.unsqueeze(1) == tokens.unsqueeze(0)).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    i2t = torch.sum(-target * logits.log_softmax(1), 1).mean()
    t2i = torch.sum(-target * logits.t().log_softmax(1), 1).mean()
    return 0.5 * (i2t + t2i)


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, seed: int) -> dict[str, float]:
    def feats(images: list[Image.Image]) -> torch.Tensor:
        x = to_tensor(images)
        return torch.cat([model.encode_image(x[i : i + 500]) for i in range(0, len(x), 500)])

    weights = []
    for name in CLASSES:
        emb = torch.nn.functional.normalize(
            model.encode_text(tokenizer([t.format(name) for t in TEMPLATES])), dim=-1
        )
        weights.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    w = torch.stack(weights)
    out: dict[str, float] = {}
    for style in ("photo", "sketch"):
        images, labels, _ = make_split(style, 60, seed + 100, stream=3)  # type: ignore[arg-type]
        f = torch.nn.functional.normalize(feats(images), dim=-1)
        out[f"zero_shot_{style}"] = float(((f @ w.t()).argmax(1) == torch.tensor(labels)).float().mean())
    train, y_train, _ = make_split("sketch", 60, seed + 200, stream=4)
    test, y_test, _ = make_split("sketch", 60, seed + 300, stream=4)
    out["probe_sketch"] = linear_probe(feats(train), y_train, feats(test), y_test)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/shapes"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--per-class", type=int, default=300, help="photo and outlined images per class")
    p.add_argument("--sketch-per-class", type=int, default=100, help="style-captioned sketches per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_config.json").write_text(json.dumps(CONFIG, indent=2))
    model = open_clip.CLIP(**CONFIG)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=CONFIG["text_cfg"]["context_length"])

    start = time.perf_counter()
    images: list[Image.Image] = []
    captions: list[str] = []
    for style, n in (
        ("photo", args.per_class),
        ("outlined", args.per_class),
        ("sketch", args.sketch_per_class),
    ):
        imgs, _labels, caps = make_split(style, n, args.seed, stream=1, captions=True)  # type: ignore[arg-type]
        images += imgs
        captions += caps
    pool, tokens = to_tensor(images), tokenizer(captions)
    print(f"pool: {len(images)} images, {len(set(captions))} distinct captions", flush=True)

    augment = K.AugmentationSequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=(0.5, 1.0)), K.RandomHorizontalFlip()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(pool), (args.batch_size,), generator=gen)
        loss = contrastive_loss(model, augment(pool[idx]), tokens[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    torch.save(model.state_dict(), args.out / "checkpoint.pt")
    report: dict[str, Any] = {**evaluate(model, tokenizer, args.seed), "seconds": time.perf_counter() - start}
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
