"""Command line: ``python -m lafter adapt|classify|zeroshot|models``.

python -m lafter adapt --model ViT-B-32::openai --classes cat,dog,horse --images ./photos --out pets.safetensors
python -m lafter adapt ... --recipe paper --descriptions-file sentences.json --eval-dir ./labelled
python -m lafter classify --artifact pets.safetensors ./photos/img1.jpg ./photos/img2.jpg
python -m lafter zeroshot --model ViT-B-32::openai --classes cat,dog,horse ./photos/img1.jpg
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lafter.artifact import AdaptedModel
from lafter.backbone import list_base_models, load_backbone, parse_spec
from lafter.descriptions import DescriptionConfig, class_text
from lafter.errors import InvalidInputError, LafterError
from lafter.finetune import RECIPES, AdaptConfig
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
        if not self.enabled or event.starts_stage:
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
    """argparse type: a positive integer or "auto"."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return number


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_order(paths: Sequence[Path], exclude: set[str]) -> tuple[list[Path], int, int]:
    """The training images as the service takes them: one per distinct content, in the order of
    their SHA-256 (so the same images give the same model whatever their names or folder order),
    none whose content is in ``exclude`` (the evaluation split). Returns (paths, duplicates,
    excluded)."""
    by_digest: dict[str, Path] = {}
    duplicates = excluded = 0
    for p in paths:
        digest = _file_digest(p)
        if digest in exclude:
            excluded += 1
        elif digest in by_digest:
            duplicates += 1
        else:
            by_digest[digest] = p
    return [by_digest[d] for d in sorted(by_digest)], duplicates, excluded


def _descriptions(args: argparse.Namespace, classes: list[str]) -> DescriptionConfig:
    if args.descriptions_file is None:
        if args.descriptions == "provided":
            raise InvalidInputError("--descriptions provided needs --descriptions-file PATH")
        return DescriptionConfig(source=args.descriptions, per_class=args.per_class, domain=args.domain)
    if args.descriptions not in ("auto", "provided"):
        raise InvalidInputError(
            f"--descriptions-file gives the sentences; it cannot be combined with --descriptions {args.descriptions}"
        )
    path = Path(args.descriptions_file)
    try:
        provided = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(
            f"--descriptions-file {path}: cannot read it ({exc.strerror or exc})"
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--descriptions-file {path}: not valid JSON ({exc})") from exc
    if not isinstance(provided, dict):
        raise InvalidInputError(
            f"--descriptions-file {path}: expected a JSON object {{class name: [sentences, ...]}}, "
            f"got a {type(provided).__name__}"
        )
    for name, sentences in provided.items():
        if not isinstance(sentences, list) or not all(isinstance(x, str) for x in sentences):
            raise InvalidInputError(
                f"--descriptions-file {path}: the value for {name!r} must be a list of strings"
            )
    known = {class_text(c).casefold() for c in classes}
    unknown = [k for k in provided if class_text(k).casefold() not in known]
    if unknown:
        raise InvalidInputError(f"--descriptions-file {path}: names classes not in --classes: {unknown[:10]}")
    given = {class_text(k).casefold() for k, v in provided.items() if any(x.strip() for x in v)}
    missing = [c for c in classes if class_text(c).casefold() not in given]
    if missing:
        raise InvalidInputError(f"--descriptions-file {path}: no sentences for {missing[:10]}")
    return DescriptionConfig(
        source="provided", per_class=args.per_class, domain=args.domain, provided=provided
    )


def _eval_split(folder: str, classes: list[str]) -> tuple[list[Path], list[int]]:
    """A labelled evaluation split laid out FOLDER/class_name/*.jpg: (paths, class indices)."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"--eval-dir {root}: not a folder")
    index = {class_text(c).casefold(): i for i, c in enumerate(classes)}
    loose = [p.name for p in iter_image_files(root, recursive=False)]
    if loose:
        raise InvalidInputError(
            f"--eval-dir {root}: images must be in one folder per class (FOLDER/class_name/image.jpg); "
            f"found {loose[:5]} directly in it"
        )
    paths: list[Path] = []
    labels: list[int] = []
    unknown: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = list(iter_image_files(sub))
        if not files:
            continue
        label = index.get(class_text(sub.name).casefold())
        if label is None:
            unknown.append(sub.name)
            continue
        paths.extend(files)
        labels.extend([label] * len(files))
    if unknown:
        raise InvalidInputError(
            f"--eval-dir {root}: folders {unknown[:10]} are not among --classes {classes}"
        )
    if not paths:
        raise InvalidInputError(f"--eval-dir {root}: no images in its class folders")
    return paths, labels


def cmd_adapt(args: argparse.Namespace) -> int:
    classes = _classes(args)
    parse_spec(args.model)  # a bad spec or sentences file fails before any image is read
    descriptions = _descriptions(args, classes)
    adapt_config = AdaptConfig(
        recipe=args.recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        prompt_tokens=args.prompt_tokens,
        pseudo_label_balance=args.pseudo_label_balance,
        balance_tau=args.balance_tau,
        compile=args.compile,
    )
    eval_paths, eval_labels = _eval_split(args.eval_dir, classes) if args.eval_dir else ([], [])
    # The evaluation split is never trained on, even where --images contains it.
    train_paths, duplicates, excluded = _content_order(
        _image_paths([args.images]), {_file_digest(p) for p in eval_paths}
    )
    if len(train_paths) < 2:
        raise InvalidInputError(f"--images {args.images}: fewer than 2 distinct images to train on")
    backbone = load_backbone(args.model, device=args.device, precision=args.precision)
    bars = _Bars(not args.quiet)
    n = len(train_paths) + len(eval_paths)
    with tqdm(total=n, desc="decoding", unit="img", file=sys.stderr, disable=args.quiet) as bar:
        cache = ImageCache.from_paths(train_paths, backbone.image_size)
        bar.update(len(train_paths))
        eval_cache = ImageCache.from_paths(eval_paths, backbone.image_size) if eval_paths else None
        bar.update(len(eval_paths))
    llm_config = LLMConfig.from_env()
    if args.llm_base_url:
        llm_config = LLMConfig(
            base_url=args.llm_base_url, model=args.llm_model or llm_config.model, api_key=llm_config.api_key
        )
    run = run_lafter(
        backbone,
        classes,
        cache,
        descriptions=descriptions,
        llm=LLMClient(llm_config) if llm_config.configured else None,
        text_config=TextClassifierConfig(steps=args.text_steps),
        adapt_config=adapt_config,
        seed=args.seed,
        progress=bars,
        eval_images=eval_cache,
        eval_labels=eval_labels or None,
    )
    bars.close()
    served = run.served_model
    checksum = served.save(args.out)
    reason = run.guard.reason if run.guard is not None else "no evaluation: the adapted model"
    summary: dict[str, Any] = {
        "artifact": str(args.out),
        "sha256": checksum,
        "base_model": backbone.spec,
        "classes": classes,
        "images": len(cache),
        "images_skipped": {"duplicates": duplicates, "in_eval_split": excluded},
        "eval_images": len(eval_paths),
        "recipe": run.adaptation.resolved["recipe"],
        "served": {
            "kind": run.served_kind,
            "reason": reason,
            "saved": f"{args.out} holds the {run.served_kind} classifier"
            + ("" if run.served_kind == "lafter" else ", not the adapted model"),
        },
        "descriptions": {
            "requested": descriptions.source,
            "source": run.descriptions.source_used,
            "sentences": len(run.descriptions.sentences),
            **({"file": str(args.descriptions_file)} if args.descriptions_file else {}),
        },
        "warnings": run.warnings,
        "hyperparameters": run.hyperparameters(),
        "evaluation": run.evaluation,
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
    a.add_argument(
        "--eval-dir",
        help="a labelled evaluation split, EVAL_DIR/class_name/*.jpg: used to choose the classifier "
        "saved to --out and to report accuracies, never trained on",
    )
    a.add_argument("--out", required=True, help="where to write the adapted model (.safetensors)")
    a.add_argument("--descriptions", default="auto", choices=["auto", "llm", "templates", "provided"])
    a.add_argument(
        "--descriptions-file",
        help="your own sentences, a JSON object {class name: [sentence, ...]} (source 'provided')",
    )
    a.add_argument("--per-class", type=int, default=10, help="LLM answers per question")
    a.add_argument("--domain", help="target domain for targeted prompts, e.g. 'sketch'")
    a.add_argument("--llm-base-url", help="OpenAI-compatible server (or LAFTER_LLM_BASE_URL)")
    a.add_argument("--llm-model", help="model name on that server (or LAFTER_LLM_MODEL)")
    a.add_argument("--text-steps", default="auto", type=_auto_int)
    a.add_argument("--epochs", default="auto", type=_auto_int)
    a.add_argument("--batch-size", default="auto", type=_auto_int)
    a.add_argument("--max-steps", type=int)
    a.add_argument("--prompt-tokens", default="auto", type=_auto_int, help="'auto': the recipe's")
    a.add_argument(
        "--recipe", default="default", choices=list(RECIPES), help="stage 2's recipe for 'auto' values"
    )
    a.add_argument("--pseudo-label-balance", default="auto", choices=["auto", "none", "align"])
    a.add_argument("--balance-tau", type=float, default=AdaptConfig.balance_tau, help="strength of 'align'")
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
