"""Proof that LaFTer adapts: a tiny CLIP pretrained on one visual style, adapted to another.

The world (bench/shapes/world.py): ten shape classes; the tiny CLIP is pretrained contrastively
(bench/shapes/pretrain.py) on filled shapes ("photo", "outlined") whose captions name the shape, and on
ink sketches whose captions never do. The TARGET style "sketch" is thus never seen labelled. This script
then measures on held-out TARGET images, per seed:

- zero-shot CLIP (8 templates), the stage-1 text classifier, and LaFTer (fast data path);
- LaFTer in the reference regime (per-image PIL views, fp32), for the accuracy check and speed ratio;
- the fairness check: a supervised linear probe on frozen target features (weak and strong views):
  self-training can only help where the probe is far above zero-shot.

    python -m bench.synthetic --seeds 0 1 2            # pretrains bench/out/shapes first if missing
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.shapes import pretrain
from bench.shapes.probe import linear_probe
from bench.shapes.world import CLASSES, make_split
from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone, load_backbone
from lafter.descriptions import DescriptionConfig, generate_descriptions
from lafter.finetune import AdaptConfig, adapt
from lafter.predict import AdaptedClassifier, ZeroShotClassifier
from lafter.text_cache import InMemoryEmbeddingCache, embed_sentences
from lafter.text_classifier import train_text_classifier
from lafter.views import ImageCache, ReferenceViews, ViewMaker

REPO = Path(__file__).resolve().parents[1]
SOURCE_STYLE = "photo"
# streams keep the benchmark's images disjoint from the pretraining pool (stream 1) and from each other
UNLABELED_STREAM, TEST_STREAM, PROBE_STREAM = 2, 3, 4


def ensure_world(out: Path, steps: int, seed: int) -> str:
    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        print(f"pretraining the tiny CLIP into {out} (once)...", flush=True)
        pretrain.main(["--out", str(out), "--steps", str(steps), "--seed", str(seed)])
    return f"{out / 'model_config.json'}::{ckpt}"


def accuracy(probs: torch.Tensor, labels: list[int]) -> float:
    return float((probs.argmax(1) == torch.tensor(labels)).float().mean())


@torch.no_grad()
def features(backbone: Backbone, batch: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [backbone.model.encode_image(batch[i : i + 256]).float() for i in range(0, len(batch), 256)]
    )


def probe_figures(backbone: Backbone, target: Any, seed: int, per_class: int) -> dict[str, float]:
    """Supervised linear probe on target features: the ceiling self-training can hope to approach."""
    train_imgs, train_y = make_split(target, per_class, seed=seed, stream=PROBE_STREAM)[:2]
    test_imgs, test_y = make_split(target, per_class, seed=seed + 1000, stream=PROBE_STREAM)[:2]
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std)
    ref = ReferenceViews(backbone.image_size, backbone.mean, backbone.std)
    torch.manual_seed(seed)
    tr = ImageCache.from_pil(train_imgs, backbone.image_size).data
    te = ImageCache.from_pil(test_imgs, backbone.image_size).data
    weak = linear_probe(
        features(backbone, views.weak(tr)), train_y, features(backbone, views.weak(te)), test_y
    )
    strong_gpu = linear_probe(
        features(backbone, views.strong(tr)), train_y, features(backbone, views.strong(te)), test_y
    )
    strong_pil = linear_probe(
        features(backbone, torch.stack([ref.strong(im) for im in train_imgs])),
        train_y,
        features(backbone, torch.stack([ref.strong(im) for im in test_imgs])),
        test_y,
    )
    return {"probe_weak": weak, "probe_strong": strong_gpu, "probe_strong_reference_pil": strong_pil}


def run_seed(args: argparse.Namespace, backbone: Backbone, seed: int) -> dict[str, Any]:
    unlabeled, hidden_y, _ = make_split(
        args.target, args.unlabeled_per_class, seed=seed, stream=UNLABELED_STREAM
    )
    test_imgs, test_y = make_split(args.target, args.test_per_class, seed=seed, stream=TEST_STREAM)[:2]
    src_imgs, src_y = make_split(SOURCE_STYLE, args.test_per_class, seed=seed, stream=TEST_STREAM)[:2]
    test_cache = ImageCache.from_pil(test_imgs, backbone.image_size)
    out: dict[str, Any] = {"seed": seed, "unlabeled_images": len(unlabeled), "test_images": len(test_imgs)}

    def acc(
        model: AdaptedModel, images: list[Image.Image] | None = None, labels: list[int] | None = None
    ) -> float:
        clf = AdaptedClassifier(backbone, model)
        if images is None:
            return accuracy(clf.predict_uint8(test_cache.data), test_y)
        return accuracy(clf.predict_images(images), labels or [])

    zs = ZeroShotClassifier(backbone, CLASSES).adapted
    out["zero_shot"] = acc(zs)
    out["zero_shot_source_style"] = acc(zs, src_imgs, src_y)

    desc = generate_descriptions(
        CLASSES, DescriptionConfig(source="templates", template_set=args.templates, domain=args.domain)
    )
    emb = embed_sentences(backbone, desc.sentences, InMemoryEmbeddingCache())
    text = train_text_classifier(emb, desc.labels, len(CLASSES), seed=seed)
    text_model = AdaptedModel.from_text_head(backbone.spec, CLASSES, text.head)
    out["text_classifier"] = acc(text_model)
    out["sentences"] = len(desc.sentences)

    cfg = AdaptConfig(epochs=args.epochs, batch_size=args.batch_size, pseudo_label_balance=args.balance)
    cache = ImageCache.from_pil(unlabeled, backbone.image_size)
    t = time.perf_counter()
    fast = adapt(backbone, text.head, cache, CLASSES, cfg, seed=seed)
    out["lafter_seconds"] = time.perf_counter() - t
    out["lafter"] = acc(fast.model)
    out["lafter_steps"] = fast.steps
    out["lafter_images_per_s"] = fast.images_per_s
    # how good the teacher's pseudo-labels were on the unlabeled pool (labels used only for this figure)
    text_on_pool = AdaptedClassifier(backbone, text_model).predict_uint8(cache.data)
    out["pseudo_label_accuracy_start"] = accuracy(text_on_pool, hidden_y)
    adapted_on_pool = AdaptedClassifier(backbone, fast.model).predict_uint8(cache.data)
    out["pool_accuracy_after"] = accuracy(adapted_on_pool, hidden_y)

    if not args.skip_reference:
        ref_cfg = AdaptConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            data_path="reference",
            pseudo_label_balance=args.balance,
        )
        ref = adapt(backbone, text.head, unlabeled, CLASSES, ref_cfg, seed=seed)
        out["lafter_reference_regime"] = acc(ref.model)
        out["reference_images_per_s"] = ref.images_per_s
        out["speed_ratio_fast_vs_reference"] = fast.images_per_s / ref.images_per_s
    if not args.skip_probe:
        out.update(probe_figures(backbone, args.target, seed, args.probe_per_class))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=REPO / "bench" / "out" / "shapes")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", default="sketch", choices=["sketch", "marker"], help="target style")
    p.add_argument(
        "--balance", default="none", choices=["none", "align"], help="AdaptConfig.pseudo_label_balance"
    )
    p.add_argument("--unlabeled-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--probe-per-class", type=int, default=100)
    p.add_argument("--epochs", default="auto")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--templates", default="imagenet", choices=["imagenet", "cifar", "all"])
    p.add_argument("--domain", default=None, help="targeted templates, e.g. 'sketch'")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "synthetic.json")
    args = p.parse_args()
    args.epochs = args.epochs if args.epochs == "auto" else int(args.epochs)
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    torch.set_num_threads(args.threads)

    spec = ensure_world(args.world, args.pretrain_steps, args.pretrain_seed)
    backbone = load_backbone(spec, device="auto")
    rows = []
    for seed in args.seeds:
        row = run_seed(args, backbone, seed)
        rows.append(row)
        print(json.dumps(row), flush=True)

    keys = [
        "zero_shot",
        "text_classifier",
        "lafter",
        "lafter_reference_regime",
        "probe_weak",
        "probe_strong",
        "probe_strong_reference_pil",
        "zero_shot_source_style",
        "pseudo_label_accuracy_start",
        "pool_accuracy_after",
    ]
    print("\nheld-out TARGET-style accuracy (%), chance = 10")
    print("| seed | " + " | ".join(k for k in keys if k in rows[0]) + " |")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{100 * r[k]:.1f}" for k in keys if k in r) + " |")
    summary = {k: statistics.mean(r[k] for r in rows) for k in keys if k in rows[0]}
    print("| mean | " + " | ".join(f"{100 * v:.1f}" for v in summary.values()) + " |")
    gains = [r["lafter"] - r["zero_shot"] for r in rows]
    print(f"LaFTer - zero-shot: {', '.join(f'{100 * g:+.1f}' for g in gains)} points")
    if "speed_ratio_fast_vs_reference" in rows[0]:
        ratios = [r["speed_ratio_fast_vs_reference"] for r in rows]
        print(f"stage-2 images/s, fast / reference regime: {', '.join(f'{x:.2f}x' for x in ratios)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"spec": spec, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
