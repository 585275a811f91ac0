"""Recipe sweep on the TUNE worlds: test accuracy of stage-2 variants along the run.

Used to choose the default recipe (lafter/finetune.py); only TUNE worlds may be swept, the
held-out worlds of bench/quality.py are for the final report.

    OMP_NUM_THREADS=1 python -m bench.recipe_sweep --world marker32 --seeds 0 1 --steps 200 400 800

One stage-1 text classifier per seed (templates), shared by the variants; each variant is one stage-2
run whose trainable tensors are evaluated on the world's held-out test set at the listed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from bench.shapes.models import spec_string
from bench.shapes.worlds import WORLDS
from lafter.artifact import AdaptedModel
from lafter.backbone import load_backbone
from lafter.descriptions import DescriptionConfig, generate_descriptions
from lafter.finetune import AdaptConfig, adapt
from lafter.predict import AdaptedClassifier
from lafter.prompted import HEAD, LN_PREFIX, PROMPTS
from lafter.text_cache import embed_sentences
from lafter.text_classifier import train_text_classifier
from lafter.views import ImageCache

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"recipe": "paper"},
    "default": {},
    "default_no_align": {"pseudo_label_balance": "none"},
    "default_tau_0.5": {"balance_tau": 0.5},
    "default_first_batch_prior": {"balance_prior_init": "first_batch"},
    "paper_align": {"recipe": "paper", "pseudo_label_balance": "align"},
    "default_ref_views": {"strong_crop_scale": (0.2, 1.0), "strong_blur_sigma": (0.1, 2.0)},
    "default_50_prompts": {"prompt_tokens": 50},
    "default_16_prompts": {"prompt_tokens": 16},
    "default_8_prompts": {"prompt_tokens": 8},
    "default_4_prompts": {"prompt_tokens": 4},
}


def _model(backbone: Any, names: list[str], trainable: dict[str, torch.Tensor]) -> AdaptedModel:
    tensors = {PROMPTS: trainable["prompts"], HEAD: trainable["head.weight"]}
    for k, v in trainable.items():
        if k.startswith("ln."):
            tensors[LN_PREFIX + k[3:].replace("__", ".")] = v
    return AdaptedModel(backbone.spec, names, tensors, kind="lafter", normalize_features=False)


def accuracy(backbone: Any, model: AdaptedModel, test: ImageCache, labels: torch.Tensor) -> float:
    probs = AdaptedClassifier(backbone, model).predict_uint8(test.data)
    return float((probs.argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="marker32")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--steps", type=int, nargs="+", default=[200, 400, 800])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    world = WORLDS[args.world]
    if not world.tune:
        raise SystemExit(f"{args.world} is a held-out world: sweep only TUNE worlds")
    from pathlib import Path

    spec = spec_string(Path("bench/out/quality/models") / world.model)
    backbone = load_backbone(spec, device="cpu")
    names = world.class_names
    results: dict[str, dict[int, dict[int, float]]] = {v: {} for v in args.variants}
    start = time.perf_counter()
    for seed in args.seeds:
        pool_imgs, _ = world.pool(args.pool, seed)
        test_imgs, test_y = world.test_set(args.test_per_class, seed)
        pool = ImageCache.from_pil(pool_imgs, backbone.image_size)
        test = ImageCache.from_pil(test_imgs, backbone.image_size)
        y = torch.tensor(test_y)
        desc = generate_descriptions(names, DescriptionConfig(source="templates"))
        text = train_text_classifier(
            embed_sentences(backbone, desc.sentences), desc.labels, len(names), seed=seed
        )
        zs = accuracy(backbone, AdaptedModel.zero_shot(backbone, names), test, y)
        tc = accuracy(backbone, AdaptedModel.from_text_head(spec, names, text.head), test, y)
        print(f"seed {seed}: zero-shot {zs:.3f}  text {tc:.3f}", flush=True)
        for variant in args.variants:
            at: dict[int, float] = {}

            def hook(
                step: int,
                total: int,
                snapshot: Any,
                at: dict[int, float] = at,
                test: ImageCache = test,
                y: torch.Tensor = y,
            ) -> None:
                if step in args.steps:
                    at[step] = accuracy(backbone, _model(backbone, names, snapshot().trainable), test, y)

            cfg = AdaptConfig(**{**VARIANTS[variant], "max_steps": max(args.steps), "epochs": 1000})
            res = adapt(backbone, text.head, pool, names, cfg, seed=seed, checkpoint=hook)
            results[variant][seed] = at
            hist = res.pseudo_label_histogram
            print(
                f"  {variant:28s} "
                + "  ".join(f"{s}:{at.get(s, float('nan')):.3f}" for s in args.steps)
                + f"  (pseudo-label min/max share {min(hist) / sum(hist):.3f}/{max(hist) / sum(hist):.3f})",
                flush=True,
            )
    print(f"\n{args.world}: mean over seeds {args.seeds} ({time.perf_counter() - start:.0f} s)")
    for variant, per_seed in results.items():
        cells = []
        for s in args.steps:
            vals = [per_seed[seed][s] for seed in per_seed if s in per_seed[seed]]
            cells.append(f"{s}:{statistics.mean(vals):.3f}" if vals else f"{s}:-")
        print(f"  {variant:28s} " + "  ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
