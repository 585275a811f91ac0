"""Speed benchmark: our stage-2 data path vs the reference regime, the text classifier, classify.

Every figure is measured in this one process, side by side, and reported as a ratio.

CPU (small settings; what CI machines can run):
    python bench/speed.py --model tests/assets/tiny-vit.json::random --batch 50 --steps 20

GPU (see bench/gpu_check.sh):
    python bench/speed.py --model ViT-B-32::random --batch 256 --ref-batch 50 --steps 60 \
        --ref-workers 4 --text-sentences 130000 --text-classes 1000 --text-steps 3000 --compile
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lafter.artifact import AdaptedModel
from lafter.backbone import load_backbone
from lafter.finetune import AdaptConfig, adapt
from lafter.predict import AdaptedClassifier
from lafter.prompted import layernorm_names
from lafter.text_classifier import TextClassifierConfig, train_text_classifier
from lafter.views import ImageCache, open_image


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs in memory (smooth colour fields + noise, so they compress like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(n):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(a * xx + b * yy + p) for p in rng.uniform(0, 6, 3)], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (height, width, 3)) + c).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_stage2(
    args: argparse.Namespace, backbone: Any, head: torch.nn.Linear, classes: list[str]
) -> dict[str, Any]:
    jpegs = make_jpegs(args.images, args.source_width, args.source_height)
    res: dict[str, Any] = {"images": len(jpegs), "source_size": f"{args.source_width}x{args.source_height}"}

    t = time.perf_counter()
    cache = ImageCache.from_sources(jpegs, backbone.image_size, workers=args.decode_workers)
    res["cache_build_s"] = time.perf_counter() - t
    res["cache_decode_images_per_s"] = len(jpegs) / res["cache_build_s"]

    def run_fast(steps: int) -> float:
        cfg = AdaptConfig(
            batch_size=args.batch, max_steps=steps, epochs=1000, compile=args.compile, log_every=10**9
        )
        _sync()
        r = adapt(backbone, head, cache, classes, cfg, seed=0)
        _sync()
        return r.steps * r.resolved["batch_size"] / r.seconds

    run_fast(args.warmup)  # compile, cudnn autotune, allocator
    res["fast_images_per_s"] = run_fast(args.steps)
    res["fast_batch"] = args.batch
    res["fast_precision"] = "bf16" if backbone.amp_dtype is not None else "fp32"
    # end to end over E epochs, the one-off decode included (E=1 is the worst case)
    e, n = args.epochs_for_amortising, len(jpegs)
    res["fast_end_to_end_images_per_s"] = e * n / (res["cache_build_s"] + e * n / res["fast_images_per_s"])
    res["end_to_end_epochs"] = e

    # the reference regime: fp32 (no TF32), per-image PIL decode + views in a DataLoader
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pil_sources = [open_image(j) for j in jpegs] if args.ref_preloaded else jpegs
    cfg = AdaptConfig(
        batch_size=args.ref_batch,
        max_steps=args.ref_steps,
        epochs=1000,
        data_path="reference",
        reference_workers=args.ref_workers,
        log_every=10**9,
    )
    _sync()
    r = adapt(backbone, head, pil_sources, classes, cfg, seed=0)  # type: ignore[arg-type]
    _sync()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    res["reference_images_per_s"] = r.steps * r.resolved["batch_size"] / r.seconds
    res["reference_batch"] = args.ref_batch
    res["reference_workers"] = args.ref_workers
    res["ratio_fast_vs_reference"] = res["fast_images_per_s"] / res["reference_images_per_s"]
    return res


def bench_text(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(args.text_sentences, args.text_dim, generator=g), dim=-1)
    y = torch.randint(0, args.text_classes, (args.text_sentences,), generator=g)
    out: dict[str, Any] = {
        "sentences": args.text_sentences,
        "classes": args.text_classes,
        "steps": args.text_steps,
        "dim": args.text_dim,
    }
    variants = [("reference_fp32_dense", "fp32", "dense"), ("fp32_auto", "fp32", "auto")]
    if dev.type == "cuda":
        variants.append(("bf16_auto", "bf16", "auto"))
    for name, precision, noise in variants:
        cfg = TextClassifierConfig(
            steps=args.text_steps, precision=precision, noise_sampling=noise, log_every=10**9
        )  # type: ignore[arg-type]
        train_text_classifier(
            x, y, args.text_classes, TextClassifierConfig(steps=3, precision=precision), device=dev
        )
        _sync()
        r = train_text_classifier(x, y, args.text_classes, cfg, device=dev)
        _sync()
        out[f"{name}_s"] = r.seconds
        out[f"{name}_noise"] = r.resolved["noise_sampling"]
    out["ratio_best_vs_reference"] = out["reference_fp32_dense_s"] / min(
        v for k, v in out.items() if k.endswith("_s")
    )
    return out


def bench_classify(
    args: argparse.Namespace, backbone: Any, head: torch.nn.Linear, classes: list[str]
) -> dict[str, Any]:
    model = AdaptedModel.from_text_head(backbone.spec, classes, head)
    clf = AdaptedClassifier(backbone, model)
    u8 = torch.randint(
        0, 255, (args.classify_batch, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8
    )
    clf.predict_uint8(u8, batch_size=args.classify_batch)
    _sync()
    t = time.perf_counter()
    reps = args.classify_reps
    for _ in range(reps):
        clf.predict_uint8(u8, batch_size=args.classify_batch)
    _sync()
    batched = reps * args.classify_batch / (time.perf_counter() - t)
    lat = []
    one = u8[:1]
    for _ in range(args.latency_reps):
        t = time.perf_counter()
        clf.predict_uint8(one)
        _sync()
        lat.append(time.perf_counter() - t)
    params = dict(backbone.visual.named_parameters())
    tensors = {"prompts": torch.zeros(50, backbone.width), "head.weight": head.weight.detach()}
    tensors.update({f"ln.{n}": params[n].detach() for n in layernorm_names(backbone.visual)})
    delta_bytes = len(AdaptedModel(backbone.spec, classes, tensors).to_bytes())
    base_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    return {
        "batched_images_per_s": batched,
        "batch": args.classify_batch,
        "single_image_p50_ms": 1000 * statistics.median(lat),
        "delta_bytes": delta_bytes,
        "base_bytes": base_bytes,
        "memory_100_models_vs_one": (base_bytes + 100 * delta_bytes) / (base_bytes + delta_bytes),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tests/assets/tiny-vit.json::random")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--source-width", type=int, default=320)
    p.add_argument("--source-height", type=int, default=240)
    p.add_argument("--decode-workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--epochs-for-amortising", type=int, default=1, help="epochs sharing one cache build")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ref-batch", type=int, default=50)
    p.add_argument("--ref-steps", type=int, default=10)
    p.add_argument("--ref-workers", type=int, default=0)
    p.add_argument(
        "--ref-preloaded", action="store_true", help="reference gets decoded PIL images (no JPEG decode)"
    )
    p.add_argument("--text-sentences", type=int, default=680)
    p.add_argument("--text-classes", type=int, default=10)
    p.add_argument("--text-dim", type=int, default=512)
    p.add_argument("--text-steps", type=int, default=400)
    p.add_argument("--classify-batch", type=int, default=256)
    p.add_argument("--classify-reps", type=int, default=5)
    p.add_argument("--latency-reps", type=int, default=50)
    p.add_argument("--skip", action="append", default=[], choices=["stage2", "text", "classify"])
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()

    backbone = load_backbone(args.model)
    classes = [f"class{i}" for i in range(args.classes)]
    head = torch.nn.Linear(backbone.embed_dim, args.classes, bias=False)
    report: dict[str, Any] = {
        "model": args.model,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    if "text" not in args.skip:
        report["text_classifier"] = bench_text(args, backbone.device)
        print(json.dumps({"text_classifier": report["text_classifier"]}), flush=True)
    if "classify" not in args.skip:
        report["classify"] = bench_classify(args, backbone, head, classes)
        print(json.dumps({"classify": report["classify"]}), flush=True)
    if "stage2" not in args.skip:
        report["stage2"] = bench_stage2(args, backbone, head, classes)
        print(json.dumps({"stage2": report["stage2"]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
