"""LaFTer end to end: descriptions -> text embeddings -> text classifier -> unsupervised finetuning
-> the choice of the classifier to serve (``lafter.guard``).

The CLI and the service's worker both go through ``run_lafter``: the worker adds its caches, a
checkpoint hook that stores the run's state, and a checkpoint to resume from after a lost worker.
Every stage starts with a ``ProgressEvent.stage_started`` event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.checkpoint import RunCheckpoint
from lafter.descriptions import DescriptionConfig, Descriptions, generate_descriptions
from lafter.errors import InvalidInputError
from lafter.finetune import AdaptCheckpoint, AdaptConfig, AdaptResult, adapt
from lafter.guard import Evaluation, evaluate_candidates
from lafter.llm import DescriptionCache, LLMClient
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel
from lafter.text_cache import EmbeddingCache, embed_sentences
from lafter.text_classifier import TextClassifierConfig, TextClassifierResult, train_text_classifier
from lafter.views import ImageCache

STAGES = ("describing", "encoding_text", "training_text_classifier", "adapting", "evaluating")

# Called after every stage-2 step with (steps done, total steps, snapshot); ``snapshot()`` copies the
# whole run's state (stage-2 state and the stage-1 head it started from), so call it only when due.
RunCheckpointHook = Callable[[int, int, Callable[[], RunCheckpoint]], None]


@dataclass
class LafterRun:
    descriptions: Descriptions
    text: TextClassifierResult
    adaptation: AdaptResult
    seconds: dict[str, float] = field(default_factory=dict)
    zero_shot: AdaptedModel | None = None
    guard: Evaluation | None = None  # None when run with evaluate=False
    images: int = 0
    device: torch.device | str = "cpu"

    @property
    def model(self) -> AdaptedModel:
        """The adapted model (whether or not it is the one to serve: see ``served_model``)."""
        return self.adaptation.model

    @property
    def text_model(self) -> AdaptedModel:
        return AdaptedModel.from_text_head(
            self.model.base_spec, self.model.class_names, self.text.head, metadata={"steps": self.text.steps}
        )

    @property
    def served_kind(self) -> str:
        """Which of "lafter", "text_classifier", "zero_shot" the evaluation chose to serve."""
        return self.guard.served if self.guard is not None else "lafter"

    @property
    def served_model(self) -> AdaptedModel:
        kind = self.served_kind
        if kind == "text_classifier":
            return self.text_model
        if kind == "zero_shot":
            assert self.zero_shot is not None
            return self.zero_shot
        return self.model

    @property
    def evaluation(self) -> dict[str, Any]:
        return self.guard.report if self.guard is not None else {}

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return list(self.descriptions_warnings()) + (self.guard.warnings if self.guard is not None else [])

    def descriptions_warnings(self) -> list[dict[str, Any]]:
        return [{"code": "descriptions", "message": w} for w in self.descriptions.warnings]

    def hyperparameters(self) -> dict[str, Any]:
        return {"text_classifier": self.text.resolved, "adapt": self.adaptation.resolved}

    def metrics(self) -> dict[str, Any]:
        """What the run did, in numbers: per stage, the evaluation's summary, seconds per stage, the
        classifier served and what the tensors depend on besides the inputs (device, threads)."""
        result = self.adaptation
        report = self.evaluation
        diagnostics = report.get("diagnostics", {})
        return {
            "descriptions": {
                "source_used": self.descriptions.source_used,
                "sentences": len(self.descriptions.sentences),
            },
            "text_classifier": {
                "steps": self.text.steps,
                "final_loss": round(self.text.final_loss, 5),
                "train_accuracy": round(self.text.train_accuracy, 4),
            },
            "adapting": {
                "steps": result.steps,
                "images": self.images,
                "images_per_s": round(result.images_per_s, 2),
                "pseudo_label_histogram": dict(
                    zip(self.model.class_names, result.pseudo_label_histogram, strict=True)
                ),
                "final_loss": result.history[-1]["loss"] if result.history else None,
                "resumed_from_step": result.resumed_from_step,
                # the adapted tensors, served or not: two runs of one request can be compared by this
                "tensors_sha256": tensors_sha256(self.model.tensors),
            },
            "evaluation": {
                "mean_confidence": {k: v["mean_confidence"] for k, v in diagnostics.items()},
                "agreement_with_zero_shot": diagnostics.get("lafter", {}).get("agreement_with_zero_shot"),
                **({"accuracy": report["labelled"]["accuracy"]} if "labelled" in report else {}),
            },
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "served": self.served_kind,
            # On a CPU the intra-op thread count changes the order of floating-point sums.
            "runtime": {
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
        }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes, in name order): equal digests mean
    bitwise equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_descriptions(
    backbone: Backbone,
    descriptions: Descriptions,
    cache: EmbeddingCache | None = None,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    emb = embed_sentences(backbone, descriptions.sentences, cache)
    if progress is not None:
        progress(ProgressEvent("encoding_text", 1, 1, {"sentences": len(descriptions.sentences)}))
    return emb


def run_lafter(
    backbone: Backbone,
    class_names: Sequence[str],
    images: ImageCache | Sequence[Image.Image],
    *,
    descriptions: DescriptionConfig | None = None,
    llm: LLMClient | None = None,
    description_cache: DescriptionCache | None = None,
    embedding_cache: EmbeddingCache | None = None,
    text_config: TextClassifierConfig | None = None,
    adapt_config: AdaptConfig | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    evaluate: bool = True,
    eval_images: ImageCache | None = None,
    eval_labels: Sequence[int] | None = None,
    checkpoint: RunCheckpointHook | None = None,
    resume_from: RunCheckpoint | None = None,
) -> LafterRun:
    """Stages 0-2, then (``evaluate``) the choice of the classifier to serve: zero-shot, the text
    classifier or the adapted model, by accuracy on ``eval_images``/``eval_labels`` when given (never
    trained on), else by the label-free guard (``lafter.guard``).

    ``checkpoint`` is called after every stage-2 step (see ``RunCheckpointHook``). ``resume_from``
    continues such a run: descriptions and embeddings are made again (from the caches, when given),
    stage 1 is not (its head comes from the checkpoint: stage 2's teacher must be the head it started
    from), and stage 2 goes on from its last step. A checkpoint stage 2 refuses (another run's)
    costs the time it saved: stage 2 starts over, with a warning event."""
    seconds: dict[str, float] = {}

    def start(stage: str, message: str | None = None) -> None:
        check_cancel(should_cancel, stage, 0)
        if progress is not None:
            progress(ProgressEvent.stage_started(stage, message))

    start("describing")
    t = time.perf_counter()
    desc = generate_descriptions(
        list(class_names),
        descriptions,
        llm=llm,
        cache=description_cache,
        progress=progress,
        should_cancel=should_cancel,
    )
    seconds["describing"] = time.perf_counter() - t
    start("encoding_text")
    t = time.perf_counter()
    emb = encode_descriptions(backbone, desc, embedding_cache, progress)
    seconds["encoding_text"] = time.perf_counter() - t
    t = time.perf_counter()
    if resume_from is not None and resume_from.text is not None:
        start("training_text_classifier", "restored the text classifier from the checkpoint")
        text = resume_from.text
    else:
        start("training_text_classifier")
        text = train_text_classifier(
            emb,
            desc.labels,
            len(desc.class_names),
            text_config,
            seed=seed,
            device=backbone.device,
            progress=progress,
            should_cancel=should_cancel,
        )
    seconds["training_text_classifier"] = time.perf_counter() - t
    start("adapting")
    t = time.perf_counter()
    hook = None
    if checkpoint is not None:
        run_hook = checkpoint

        def hook(step: int, total: int, snapshot: Callable[[], AdaptCheckpoint]) -> None:
            run_hook(step, total, lambda: RunCheckpoint(adapt=snapshot(), text=text))

    def stage2(resume: AdaptCheckpoint | None) -> AdaptResult:
        return adapt(
            backbone,
            text.head,
            images,
            desc.class_names,
            adapt_config,
            seed=seed,
            progress=progress,
            should_cancel=should_cancel,
            checkpoint=hook,
            resume_from=resume,
        )

    if resume_from is None:
        adaptation = stage2(None)
    else:
        try:
            adaptation = stage2(resume_from.adapt)
        except InvalidInputError as exc:  # refused before any step: the run differs from the saved one
            if progress is not None:
                message = f"the checkpoint does not fit this run ({exc}); stage 2 starts over"
                progress(ProgressEvent("adapting", 0, 0, message=message, level="warning"))
            adaptation = stage2(None)
    seconds["adapting"] = time.perf_counter() - t
    adaptation.model.metadata.update(
        {
            "descriptions_source": desc.source_used,
            "sentences": len(desc.sentences),
            "text_classifier": {k: v for k, v in text.resolved.items() if isinstance(v, int | float | str)},
        }
    )
    run = LafterRun(
        descriptions=desc,
        text=text,
        adaptation=adaptation,
        seconds=seconds,
        images=len(images),
        device=backbone.device,
    )
    if evaluate:
        start("evaluating")
        t = time.perf_counter()
        cache = (
            images
            if isinstance(images, ImageCache)
            else ImageCache.from_pil(list(images), backbone.image_size)
        )
        if progress is not None:
            progress(ProgressEvent("evaluating", 1, 2))
        run.zero_shot = AdaptedModel.zero_shot(backbone, list(desc.class_names))
        run.guard = evaluate_candidates(
            backbone,
            {"zero_shot": run.zero_shot, "text_classifier": run.text_model, "lafter": run.model},
            cache,
            eval_images,
            eval_labels,
        )
        seconds["evaluating"] = time.perf_counter() - t
        if progress is not None:
            report = run.guard.report
            metrics: dict[str, Any] = {"served": run.guard.served}
            if "labelled" in report:
                metrics["accuracy"] = report["labelled"]["accuracy"]
            level = "info" if run.guard.served == "lafter" else "warning"
            progress(ProgressEvent("evaluating", 2, 2, metrics, message=run.guard.reason, level=level))
    return run
