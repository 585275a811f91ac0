"""Command line: ``python -m lafter adapt|classify|zeroshot|models``.

python -m lafter adapt --model ViT-B-32::openai --classes cat,dog,horse --images ./photos --out pets.safetensors
python -m lafter classify --artifact pets.safetensors ./photos/img1.jpg ./photos/img2.jpg
python -m lafter zeroshot --model ViT-B-32::openai --classes cat,dog,horse ./photos/img1.jpg
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lafter.artifact import AdaptedModel
from lafter.backbone import list_base_models, load_backbone
from lafter.descriptions import DescriptionConfig
from lafter.errors import InvalidInputError, LafterError
from lafter.finetune import AdaptConfig
from lafter.llm import LLMClient, LLMConfig
from lafter.pipeline import run_lafter
from lafter.predict import AdaptedClassifier, ZeroShotClassifier, top_k_labels
from lafter.progress import ProgressEvent
from lafter.text_classifier import TextClassifierConfig
from lafter.views import ImageCache, iter_image_files


class _Bars:
    """One tqdm bar per stage, fed by ProgressEvents."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = tqdm(
                total=event.total, desc=event.stage, unit="step", file=sys.stderr
            )
        bar.total = event.total
        bar.n = event.step
        shown = {k: round(v, 4) for k, v in event.metrics.items() if isinstance(v, float)}
        if shown:
            bar.set_postfix(shown, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _classes(args: argparse.Namespace) -> list[str]:
    if args.classes_file:
        names = [line.strip() for line in Path(args.classes_file).read_text().splitlines() if line.strip()]
    else:
        names = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    if len(names) < 2:
        raise InvalidInputError("give at least two classes with --classes a,b,c or --classes-file")
    return names


def _image_paths(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        paths.extend(iter_image_files(p) if p.is_dir() else [p])
    if not paths:
        raise InvalidInputError("no images found")
    return paths


def _auto_int(value: str) -> int | str:
    return value if value == "auto" else int(value)


def cmd_adapt(args: argparse.Namespace) -> int:
    classes = _classes(args)
    backbone = load_backbone(args.model, device=args.device, precision=args.precision)
    paths = _image_paths([args.images])
    bars = _Bars(not args.quiet)
    with tqdm(total=len(paths), desc="decoding", unit="img", file=sys.stderr, disable=args.quiet) as bar:
        cache = ImageCache.from_paths(paths, backbone.image_size)
        bar.update(len(paths))
    llm_config = LLMConfig.from_env()
    if args.llm_base_url:
        llm_config = LLMConfig(
            base_url=args.llm_base_url, model=args.llm_model or llm_config.model, api_key=llm_config.api_key
        )
    run = run_lafter(
        backbone,
        classes,
        cache,
        descriptions=DescriptionConfig(
            source=args.descriptions, per_class=args.per_class, domain=args.domain
        ),
        llm=LLMClient(llm_config) if llm_config.configured else None,
        text_config=TextClassifierConfig(steps=_auto_int(args.text_steps)),  # type: ignore[arg-type]
        adapt_config=AdaptConfig(
            epochs=_auto_int(args.epochs),  # type: ignore[arg-type]
            batch_size=_auto_int(args.batch_size),  # type: ignore[arg-type]
            max_steps=args.max_steps,
            prompt_tokens=args.prompt_tokens,
            compile=args.compile,
        ),
        seed=args.seed,
        progress=bars,
    )
    bars.close()
    checksum = run.model.save(args.out)
    summary: dict[str, Any] = {
        "artifact": str(args.out),
        "sha256": checksum,
        "base_model": backbone.spec,
        "classes": classes,
        "images": len(cache),
        "descriptions": {
            "source": run.descriptions.source_used,
            "sentences": len(run.descriptions.sentences),
        },
        "warnings": run.descriptions.warnings,
        "hyperparameters": run.hyperparameters(),
        "pseudo_label_histogram": run.adaptation.pseudo_label_histogram,
        "seconds": run.seconds,
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _print_predictions(
    paths: Sequence[Path], probs: Any, class_names: Sequence[str], k: int, as_json: bool
) -> None:
    ranked = top_k_labels(probs, class_names, k)
    if as_json:
        rows = [
            {"image": str(p), "predictions": [{"label": label, "score": score} for label, score in r]}
            for p, r in zip(paths, ranked, strict=True)
        ]
        print(json.dumps(rows, indent=2))
        return
    for p, r in zip(paths, ranked, strict=True):
        print(f"{p}\t" + "\t".join(f"{label}:{score:.3f}" for label, score in r))


def _predict_paths(classifier: AdaptedClassifier, paths: list[Path], quiet: bool) -> Any:
    import torch

    out = []
    chunk = 256
    for start in tqdm(
        range(0, len(paths), chunk), desc="classifying", unit="batch", file=sys.stderr, disable=quiet
    ):
        out.append(classifier.predict_images([str(p) for p in paths[start : start + chunk]]))
    return torch.cat(out)


def cmd_classify(args: argparse.Namespace) -> int:
    adapted = AdaptedModel.load(args.artifact)
    spec = args.base_model or adapted.base_spec
    backbone = load_backbone(spec, device=args.device, precision=args.precision)
    classifier = AdaptedClassifier(backbone, adapted, strict_spec=args.base_model is None)
    paths = _image_paths(args.images)
    _print_predictions(
        paths, _predict_paths(classifier, paths, args.quiet), adapted.class_names, args.top_k, args.json
    )
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    classes = _classes(args)
    backbone = load_backbone(args.model, device=args.device, precision=args.precision)
    classifier = ZeroShotClassifier(backbone, classes)
    paths = _image_paths(args.images)
    _print_predictions(paths, _predict_paths(classifier, paths, args.quiet), classes, args.top_k, args.json)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for m in list_base_models([Path(d) for d in args.local_dir]):
        print(f"{m['spec']}\t{m['source']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lafter", description="Label-free adaptation of CLIP classifiers (LaFTer)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        sp.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true")

    a = sub.add_parser("adapt", help="adapt a CLIP model to a folder of unlabeled images")
    a.add_argument("--model", required=True, help="ARCH::TAG, ARCH::/ckpt.pt or /config.json::/ckpt.pt")
    a.add_argument("--classes", help="comma-separated class names")
    a.add_argument("--classes-file", help="one class name per line")
    a.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    a.add_argument("--out", required=True, help="where to write the adapted model (.safetensors)")
    a.add_argument("--descriptions", default="auto", choices=["auto", "llm", "templates"])
    a.add_argument("--per-class", type=int, default=10, help="LLM answers per question")
    a.add_argument("--domain", help="target domain for targeted prompts, e.g. 'sketch'")
    a.add_argument("--llm-base-url", help="OpenAI-compatible server (or LAFTER_LLM_BASE_URL)")
    a.add_argument("--llm-model", help="model name on that server (or LAFTER_LLM_MODEL)")
    a.add_argument("--text-steps", default="auto")
    a.add_argument("--epochs", default="auto")
    a.add_argument("--batch-size", default="auto")
    a.add_argument("--max-steps", type=int)
    a.add_argument("--prompt-tokens", type=int, default=50)
    a.add_argument("--compile", action="store_true", help="torch.compile the image tower (GPU)")
    a.add_argument("--seed", type=int, default=0)
    common(a)
    a.set_defaults(func=cmd_adapt)

    c = sub.add_parser("classify", help="classify images with an adapted model")
    c.add_argument("--artifact", required=True)
    c.add_argument(
        "--base-model",
        help="load the base from this spec instead of the one recorded (e.g. moved checkpoint)",
    )
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--json", action="store_true")
    c.add_argument("images", nargs="+")
    common(c)
    c.set_defaults(func=cmd_classify)

    z = sub.add_parser("zeroshot", help="zero-shot CLIP classification from class names (the baseline)")
    z.add_argument("--model", required=True)
    z.add_argument("--classes")
    z.add_argument("--classes-file")
    z.add_argument("--top-k", type=int, default=5)
    z.add_argument("--json", action="store_true")
    z.add_argument("images", nargs="+")
    common(z)
    z.set_defaults(func=cmd_zeroshot)

    m = sub.add_parser("models", help="list usable base models")
    m.add_argument("--local-dir", action="append", default=[], help="folder of local configs/checkpoints")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return int(args.func(args))
    except LafterError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
