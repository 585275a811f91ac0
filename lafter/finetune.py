"""Stage 2: LaFTer's unsupervised finetuning on the user's unlabeled images.

Per step, for a batch of images:
- teacher: the *current* image tower without prompts (sharing the LayerNorms being trained) on the weak
  view, L2-normalised, through the *frozen* stage-1 head, hard argmax, no grad; no threshold, no balancing;
- student: the prompted tower on the strong view, raw (not normalised) feature -> trainable head
  (initialised from the stage-1 head);
- loss: cross-entropy with label smoothing 0.1 against the pseudo-labels;
- AdamW lr 5e-4, weight decay 0.01 on prompts, head and LayerNorm weights, 0 on LayerNorm biases;
  constant lr.
Only the prompts, every LayerNorm affine of the image tower and the head are trained; the base model
is never modified (LayerNorm affines are functional overrides, see ``prompted.py``).

Two recipes (``AdaptConfig.recipe``):

- ``"paper"``: the reference, bit for bit: 50 prompt tokens, strong views with crops of 20-100% of the
  area and a blur of sigma 0.1-2.0 px, hard argmax pseudo-labels; ``epochs="auto"`` is
  ``clamp(ceil(20000 / N), 1, 50)``.
- ``"default"`` (the product's): the same method with what depends on the input scaled to the model,
  measured in docs/benchmarks.md (bench/quality.py):

  * prompt tokens from the patch count and the token width, ``round(50 * patches/49 * width/768)``
    in [4, 50]: ViT-B/32 at 224 px (49 patches, width 768) gets the reference's 50, and so does every
    larger standard tower (ViT-B/16, ViT-L/14: the cap); the benchmark's 96-wide towers get 4 (16
    patches) and 6 (49 patches). Random prompt tokens that outnumber or outweigh the patch tokens move
    the features far from the unprompted ones before any step: on both benchmark towers fewer tokens
    were better by 6-8 points at 200 steps (TUNE worlds), and the rule gained on the held-out worlds
    (docs/benchmarks.md).
  * strong-view blur sigma scaled by ``image_size / 224`` (the reference's 0.1-2.0 at 224 px) and the
    smallest crop by ``sqrt(224 / image_size)`` (0.2 at 224 px, capped at 0.5), so small images keep
    their evidence;
  * debiased pseudo-labels: the teacher's log-probabilities minus ``tau`` times the log of their
    running mean (distribution alignment, ReMixMatch: Berthelot et al., ICLR 2020; adaptive debiasing
    of CLIP pseudo-labels, DebiasPL: Wang et al., CVPR 2022, which uses tau = 1). The running mean
    starts from one teacher pass over (up to 1,024 of) the images rather than from the first batch;
  * ``epochs="auto"`` gives at least ``AUTO_MIN_STEPS`` steps (up to 200 epochs), so that small sets
    get enough steps, and at least one epoch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from lafter.artifact import AdaptedModel
from lafter.backbone import Backbone
from lafter.device import precision_name
from lafter.errors import InvalidInputError
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel
from lafter.prompted import HEAD, LN_PREFIX, PROMPTS, PromptedTower, prompt_init_bound
from lafter.views import ImageCache, ReferenceDataset, ReferenceViews, ViewMaker

log = logging.getLogger(__name__)

STAGE = "adapting"
Recipe = Literal["default", "paper"]
RECIPES: tuple[str, ...] = ("default", "paper")
REFERENCE_EPOCHS = 50
REFERENCE_BATCH = 50
REFERENCE_PROMPTS = 50
REFERENCE_PATCHES = 49  # ViT-B/32 at 224 px, what the reference's 50 prompts were made for
REFERENCE_WIDTH = 768  # ViT-B/32's (and ViT-B/16's) token width
REFERENCE_IMAGE_SIZE = 224
REFERENCE_CROP_SCALE = (0.2, 1.0)
REFERENCE_BLUR_SIGMA = (0.1, 2.0)
# "auto" epochs, paper recipe: enough passes that the run sees about this many image-views in total,
# between 1 and the reference's 50 epochs. 500 images -> 40 epochs (400 steps at batch 50).
AUTO_TARGET_SAMPLES = 20_000
# "auto" epochs, default recipe: at least this many steps (and one epoch), at most AUTO_MAX_EPOCHS.
AUTO_MIN_STEPS = 1000
AUTO_MAX_EPOCHS = 200
PRIOR_WARMUP_IMAGES = 1024


def scaled_prompt_tokens(patches: int, width: int = REFERENCE_WIDTH) -> int:
    """Prompt tokens in proportion to the patch tokens and the token width: the reference's 50 at
    ViT-B/32's 49 patches of width 768, and 50 (the cap) for every wider or longer standard tower."""
    scaled = REFERENCE_PROMPTS * (patches / REFERENCE_PATCHES) * (width / REFERENCE_WIDTH)
    return max(4, min(REFERENCE_PROMPTS, round(scaled)))


def scaled_blur_sigma(image_size: int) -> tuple[float, float]:
    """The reference's sigma range (0.1-2.0 px at 224 px) in proportion to the image size."""
    s = min(1.0, image_size / REFERENCE_IMAGE_SIZE)
    return (round(REFERENCE_BLUR_SIGMA[0] * s, 4), round(REFERENCE_BLUR_SIGMA[1] * s, 4))


def scaled_crop_scale(image_size: int) -> tuple[float, float]:
    """Smallest crop area: the reference's 0.2 at 224 px, larger for smaller images (capped at 0.5)."""
    low = REFERENCE_CROP_SCALE[0] * math.sqrt(max(1.0, REFERENCE_IMAGE_SIZE / image_size))
    return (round(min(0.5, low), 4), 1.0)


@dataclass
class AdaptConfig:
    """Stage-2 settings. Fields left at ``"auto"`` are decided by ``recipe`` (see the module docstring)
    and echoed, resolved, in ``AdaptResult.resolved``; a value set explicitly always wins."""

    recipe: Recipe = "default"
    epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    prompt_tokens: int | Literal["auto"] = "auto"
    label_smoothing: float = 0.1
    max_steps: int | None = None
    # "fast": uint8 cache + batched views on the device + autocast (bf16 on CUDA).
    # "reference": the reference code's regime (per-image PIL views on the CPU, fp32), for comparison.
    data_path: Literal["fast", "reference"] = "fast"
    reference_workers: int = 0
    compile: bool = False
    log_every: int = 10
    # Strong-view strength: smallest/largest crop area and blur sigma range in pixels.
    strong_crop_scale: tuple[float, float] | Literal["auto"] = "auto"
    strong_blur_sigma: tuple[float, float] | Literal["auto"] = "auto"
    # "none" is the method (hard argmax, no balancing). "align": distribution alignment of the
    # teacher: its log-probabilities minus balance_tau * log(running mean of its probabilities).
    pseudo_label_balance: Literal["none", "align", "auto"] = "auto"
    balance_tau: float = 1.0
    balance_momentum: float = 0.99
    # where the running mean starts: one teacher pass over (up to 1,024 of) the images, or the first batch
    balance_prior_init: Literal["pool", "first_batch", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise InvalidInputError(f"recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")

    def resolve(
        self,
        num_images: int,
        image_size: int = REFERENCE_IMAGE_SIZE,
        patches: int = REFERENCE_PATCHES,
        width: int = REFERENCE_WIDTH,
    ) -> dict[str, Any]:
        """Every "auto" made concrete for ``num_images`` images on a tower of ``image_size`` px with
        ``patches`` patch tokens of ``width`` channels."""
        if num_images < 2:
            raise InvalidInputError("LaFTer needs at least 2 unlabeled images")
        paper = self.recipe == "paper"
        if self.batch_size == "auto":
            batch = min(REFERENCE_BATCH, num_images)
        else:
            batch = int(self.batch_size)
            if batch < 1:
                raise InvalidInputError("batch_size must be >= 1")
            batch = min(batch, num_images)
        steps_per_epoch = num_images // batch  # drop_last, as the reference's loader
        if self.epochs == "auto":
            if paper:
                epochs = max(1, min(REFERENCE_EPOCHS, math.ceil(AUTO_TARGET_SAMPLES / num_images)))
            else:
                epochs = max(1, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps_per_epoch)))
        else:
            epochs = int(self.epochs)
            if epochs < 1:
                raise InvalidInputError("epochs must be >= 1")
        total = epochs * steps_per_epoch
        if self.max_steps is not None:
            total = min(total, int(self.max_steps))
        prompts = self.prompt_tokens
        if prompts == "auto":
            prompts = REFERENCE_PROMPTS if paper else scaled_prompt_tokens(patches, width)
        elif int(prompts) < 1:
            raise InvalidInputError("prompt_tokens must be >= 1")
        crop = self.strong_crop_scale
        if crop == "auto":
            crop = REFERENCE_CROP_SCALE if paper else scaled_crop_scale(image_size)
        blur = self.strong_blur_sigma
        if blur == "auto":
            blur = REFERENCE_BLUR_SIGMA if paper else scaled_blur_sigma(image_size)
        balance = self.pseudo_label_balance
        if balance == "auto":
            balance = "none" if paper else "align"
        prior_init = self.balance_prior_init
        if prior_init == "auto":
            prior_init = "first_batch" if paper else "pool"
        return {
            **asdict(self),
            "epochs": epochs,
            "batch_size": batch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "prompt_tokens": int(prompts),
            "strong_crop_scale": [float(v) for v in crop],
            "strong_blur_sigma": [float(v) for v in blur],
            "pseudo_label_balance": balance,
            "balance_prior_init": prior_init,
        }


@dataclass
class AdaptResult:
    model: AdaptedModel
    steps: int
    epochs: int
    resolved: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    pseudo_label_histogram: list[int] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0
    resumed_from_step: int = 0  # > 0 when the run continued an ``AdaptCheckpoint``


@dataclass
class AdaptCheckpoint:
    """A stage-2 run after ``step`` optimiser steps, enough to continue it where it stopped: the
    trainable tensors, the optimiser state, and every random stream the run draws from (the epoch
    order's generator as it was when the current epoch was drawn, the global CPU and device RNGs).
    On the same device type, a resumed run ends with exactly the tensors of an uninterrupted one."""

    step: int
    fingerprint: dict[str, Any]  # what the run was; resuming a different run is refused
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    order_rng: torch.Tensor
    cpu_rng: torch.Tensor
    device_rng: torch.Tensor | None
    histogram: list[int]
    history: list[dict[str, Any]]
    teacher_prior: list[float] | None = None  # running mean teacher probabilities ("align" only)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers (``torch.load(weights_only=True)`` reads them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptCheckpoint:
        try:
            return cls(
                **{f.name: data[f.name] for f in fields(cls) if f.name in data or f.name != "teacher_prior"}
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"not a stage-2 checkpoint: {exc}") from exc


# Called after every optimiser step with (steps done, total steps, snapshot). Calling the hook is
# cheap; ``snapshot()`` copies the run's state to the CPU, so call it only when a checkpoint is due.
CheckpointHook = Callable[[int, int, Callable[[], AdaptCheckpoint]], None]


class LafterState(nn.Module):
    """The trainable set: prompts, LayerNorm affines (copies of the base's), the head."""

    def __init__(
        self, backbone: Backbone, text_head: nn.Linear, prompt_tokens: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        tower = PromptedTower(backbone.visual)
        self.ln_names = tower.ln_names
        bound = prompt_init_bound(backbone.width)
        prompts = torch.empty(prompt_tokens, backbone.width).uniform_(-bound, bound, generator=gen)
        self.prompts = nn.Parameter(prompts)
        self.ln = nn.ParameterDict(
            {_key(n): nn.Parameter(t.float()) for n, t in tower.base_layernorm_state().items()}
        )
        self.head = nn.Linear(text_head.in_features, text_head.out_features, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(text_head.weight)

    def ln_overrides(self) -> dict[str, torch.Tensor]:
        return {n: self.ln[_key(n)] for n in self.ln_names}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay = [self.prompts, self.head.weight] + [
            self.ln[_key(n)] for n in self.ln_names if n.endswith("weight")
        ]
        no_decay = [self.ln[_key(n)] for n in self.ln_names if n.endswith("bias")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {
            PROMPTS: self.prompts.detach().cpu().clone(),
            HEAD: self.head.weight.detach().cpu().clone(),
        }
        for n in self.ln_names:
            tensors[LN_PREFIX + n] = self.ln[_key(n)].detach().cpu().clone()
        return tensors


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def count_parameters(state: LafterState) -> int:
    return sum(p.numel() for p in state.parameters())


def adapt(
    backbone: Backbone,
    text_head: nn.Linear,
    images: ImageCache | Sequence[Image.Image],
    class_names: Sequence[str],
    config: AdaptConfig | None = None,
    *,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    checkpoint: CheckpointHook | None = None,
    resume_from: AdaptCheckpoint | None = None,
) -> AdaptResult:
    """Run LaFTer's stage 2 and return the adapted model (prompts, LayerNorms, head).

    ``checkpoint`` is called after every step (see ``CheckpointHook``); ``resume_from`` continues a
    run from such a snapshot, given the same backbone, stage-1 head, images, classes, config and seed
    (the fast data path only)."""
    config = config or AdaptConfig()
    if text_head.out_features != len(class_names):
        raise InvalidInputError(
            f"head has {text_head.out_features} classes but {len(class_names)} names were given"
        )
    if config.data_path == "fast" and not isinstance(images, ImageCache):
        images = ImageCache.from_pil(list(images), backbone.image_size)
    if config.data_path == "reference" and isinstance(images, ImageCache):
        raise InvalidInputError("the reference data path needs the original PIL images, not an ImageCache")
    n = len(images)
    patches = (backbone.image_size // backbone.patch_size) ** 2
    resolved = config.resolve(n, backbone.image_size, patches, backbone.width)
    amp_dtype = backbone.amp_dtype if config.data_path == "fast" else None
    resolved["precision"] = precision_name(amp_dtype)
    resolved["device"] = str(backbone.device)
    resolved["seed"] = seed
    fingerprint = _fingerprint(backbone, class_names, n, seed, resolved)
    if resume_from is not None:
        if config.data_path != "fast":
            raise InvalidInputError("resume_from needs the fast data path")
        _check_fingerprint(resume_from.fingerprint, fingerprint)

    dev = backbone.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        run = _Stage2(backbone, text_head, len(class_names), n, config, resolved, seed, amp_dtype)
        if resume_from is not None:
            run.restore(resume_from)
        elif (
            run.align is not None
            and resolved["balance_prior_init"] == "pool"
            and isinstance(images, ImageCache)
        ):
            # the running mean starts from the teacher's view of the images themselves, not one batch
            run.align.warm_start(_pool_probabilities(images, run.teacher_logits, backbone, run.batch))
        if isinstance(images, ImageCache):
            batches = _cached_batches(images, run.total, run.order, dev, backbone, run.step, resolved)
        else:
            batches = _reference_batches(images, run.batch, run.total, run.gen, backbone, config)
        run.train(batches, fingerprint, progress, should_cancel, checkpoint)

    adapted = AdaptedModel(
        base_spec=backbone.spec,
        class_names=list(class_names),
        tensors=run.state.export(),
        kind="lafter",
        normalize_features=False,
        metadata={"hyperparameters": _jsonable(resolved), "steps": run.step},
    )
    return AdaptResult(
        model=adapted,
        steps=run.step,
        epochs=int(resolved["epochs"]),
        resolved=resolved,
        history=run.history,
        pseudo_label_histogram=run.histogram.tolist(),
        images_per_s=(run.step - run.start_step) * run.batch / max(run.seconds, 1e-9),
        seconds=run.seconds,
        resumed_from_step=run.start_step,
    )


class _Stage2:
    """One stage-2 run: the trainable state, its optimiser, the frozen teacher head, the epoch order
    and the running counts, and the three things a step does (teacher pseudo-labels, one student
    update, the bookkeeping). Built inside ``adapt``'s seeded RNG scope: the prompts are drawn from
    ``gen`` here, the views from the global RNG as the batches are made."""

    def __init__(
        self,
        backbone: Backbone,
        text_head: nn.Linear,
        num_classes: int,
        num_images: int,
        config: AdaptConfig,
        resolved: dict[str, Any],
        seed: int,
        amp_dtype: torch.dtype | None,
    ) -> None:
        dev = backbone.device
        self.dev, self.amp_dtype, self.config = dev, amp_dtype, config
        self.total = int(resolved["total_steps"])
        self.batch = int(resolved["batch_size"])
        self.steps_per_epoch = int(resolved["steps_per_epoch"])
        self.gen = torch.Generator().manual_seed(seed)
        self.state = LafterState(backbone, text_head, int(resolved["prompt_tokens"]), self.gen).to(dev)
        self.frozen_head = copy.deepcopy(text_head).to(dev).requires_grad_(False)
        resolved["trainable_parameters"] = count_parameters(self.state)
        base_params = sum(p.numel() for p in backbone.visual.parameters())
        log.info(
            "LaFTer: trainable %d of %d image-tower parameters (%.4f%%); %d steps of batch %d over %d images",
            resolved["trainable_parameters"],
            base_params,
            100.0 * resolved["trainable_parameters"] / max(1, base_params),
            self.total,
            self.batch,
            num_images,
        )
        self.opt = torch.optim.AdamW(
            self.state.param_groups(config.weight_decay), lr=config.learning_rate, fused=dev.type == "cuda"
        )
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.tower = PromptedTower(backbone.visual)
        self.encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = self._encode
        if config.compile:
            self.encode = torch.compile(self._encode)
        self.align = (
            DistributionAlignment(num_classes, config.balance_tau, config.balance_momentum, dev)
            if resolved["pseudo_label_balance"] == "align"
            else None
        )
        self.histogram = torch.zeros(num_classes, dtype=torch.long, device=dev)
        self.history: list[dict[str, Any]] = []
        self.order = _EpochOrder(num_images, self.batch, self.steps_per_epoch, self.gen)
        self.step = self.start_step = 0
        self.seconds = 0.0

    def _encode(self, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        return self.tower(x, prompts, self.state.ln_overrides())  # type: ignore[no-any-return]

    def _autocast(self) -> Any:
        return torch.autocast(
            self.dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def teacher_logits(self, weak: torch.Tensor) -> torch.Tensor:
        """The current tower without prompts on the weak view, normalised, through the frozen head."""
        with torch.no_grad(), self._autocast():
            teacher = nn.functional.normalize(self.encode(weak, None).float(), dim=-1)
            return self.frozen_head(teacher)  # type: ignore[no-any-return]

    def pseudo_labels(self, weak: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.teacher_logits(weak)
            if self.align is not None:
                logits = self.align(logits)
            return logits.argmax(dim=1)

    def update(self, strong: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """One optimiser step of the student (prompted tower, trainable head) on the strong view."""
        with self._autocast():
            logits = self.state.head(self.encode(strong, self.state.prompts))
        loss = self.loss_fn(logits.float(), pseudo)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def restore(self, saved: AdaptCheckpoint) -> None:
        self.state.load_state_dict(saved.trainable)
        self.opt.load_state_dict(saved.optimizer)
        self.order.restore(saved.order_rng)
        torch.set_rng_state(saved.cpu_rng)
        if self.dev.type == "cuda" and saved.device_rng is not None:
            torch.cuda.set_rng_state(saved.device_rng, self.dev)
        self.histogram += torch.tensor(saved.histogram, dtype=torch.long, device=self.dev)
        self.history = [dict(h) for h in saved.history]
        self.step = self.start_step = saved.step
        if self.align is not None and saved.teacher_prior is not None:
            self.align.load(saved.teacher_prior)
        log.info("LaFTer: resuming at step %d of %d", self.step, self.total)

    def snapshot(self, fingerprint: dict[str, Any]) -> AdaptCheckpoint:
        return AdaptCheckpoint(
            step=self.step,
            fingerprint=fingerprint,
            trainable={k: v.detach().cpu().clone() for k, v in self.state.state_dict().items()},
            optimizer=_cpu_copy(self.opt.state_dict()),
            order_rng=self.order.rng_for(self.step),
            cpu_rng=torch.get_rng_state(),
            device_rng=torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
            histogram=self.histogram.tolist(),
            history=[dict(h) for h in self.history],
            teacher_prior=self.align.state() if self.align is not None else None,
        )

    def train(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        fingerprint: dict[str, Any],
        progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        checkpoint: CheckpointHook | None,
    ) -> None:
        """Every remaining step: pseudo-labels, update, counts; a progress event every ``log_every``
        steps (loss, speed and pseudo-label histogram over the window) and the checkpoint hook after
        every step. The loss and counts stay on the device between events (no per-step sync)."""
        window = _Window(self.histogram, self.batch)
        start = time.perf_counter()
        for weak, strong in batches:
            check_cancel(should_cancel, STAGE, self.step)
            pseudo = self.pseudo_labels(weak)
            loss = self.update(strong, pseudo)
            self.step += 1
            self.histogram += window.add(loss, pseudo)
            if progress is not None and (self.step % self.config.log_every == 0 or self.step == self.total):
                metrics = window.close(self.step, self.steps_per_epoch)
                self.history.append({"step": self.step, **metrics})
                progress(ProgressEvent(STAGE, self.step, self.total, metrics))
            if checkpoint is not None:
                checkpoint(self.step, self.total, lambda: self.snapshot(fingerprint))
        self.seconds = time.perf_counter() - start


class _Window:
    """The steps since the last progress event: summed loss, images and pseudo-label counts."""

    def __init__(self, histogram: torch.Tensor, batch: int) -> None:
        self.counts = torch.zeros_like(histogram)
        self.ones = torch.ones(batch, dtype=torch.long, device=histogram.device)
        self.loss = torch.zeros((), device=histogram.device)
        self.start, self.images, self.steps = time.perf_counter(), 0, 0

    def add(self, loss: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """Count a step; returns its pseudo-label counts. A scatter, not bincount: bincount on CUDA
        reads the max back to the host (a sync per step)."""
        counts = torch.zeros_like(self.counts).index_add_(0, pseudo, self.ones[: pseudo.shape[0]])
        self.loss += loss
        self.counts += counts
        self.images += int(pseudo.shape[0])
        self.steps += 1
        return counts

    def close(self, step: int, steps_per_epoch: int) -> dict[str, Any]:
        now = time.perf_counter()
        metrics = {
            "loss": float(self.loss.item()) / self.steps,
            "images_per_s": self.images / max(now - self.start, 1e-9),
            "pseudo_label_histogram": self.counts.tolist(),
            "epoch": (step - 1) // max(1, steps_per_epoch) + 1,
        }
        self.loss.zero_()
        self.counts.zero_()
        self.start, self.images, self.steps = now, 0, 0
        return metrics


class _EpochOrder:
    """Each epoch's image order, drawn from ``gen`` when the epoch starts (as a shuffling loader
    would). It remembers the generator state that drew the current epoch, so a checkpoint taken in
    the middle of an epoch can replay the rest of it."""

    def __init__(self, n: int, batch: int, steps_per_epoch: int, gen: torch.Generator) -> None:
        self.n, self.batch, self.steps_per_epoch, self.gen = n, batch, steps_per_epoch, gen
        self.epoch = -1
        self.epoch_rng = gen.get_state()
        self.order = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch_rng = self.gen.get_state()
            self.order = torch.randperm(self.n, generator=self.gen)
            self.epoch = epoch
        return self.order[i * self.batch : (i + 1) * self.batch]

    def rng_for(self, next_step: int) -> torch.Tensor:
        """The generator state from which ``indices(next_step)`` draws what this run draws."""
        if next_step // self.steps_per_epoch == self.epoch:
            return self.epoch_rng.clone()
        return self.gen.get_state()  # the next step starts an epoch that is not drawn yet

    def restore(self, rng: torch.Tensor) -> None:
        self.gen.set_state(rng)
        self.epoch = -1


def _cached_batches(
    images: ImageCache,
    total: int,
    order: _EpochOrder,
    dev: torch.device,
    backbone: Backbone,
    start: int,
    resolved: dict[str, Any],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(weak, strong) normalised view batches on ``dev`` for steps ``start .. total - 1``."""
    views = ViewMaker(
        backbone.image_size,
        backbone.mean,
        backbone.std,
        tuple(resolved["strong_crop_scale"]),  # type: ignore[arg-type]
        tuple(resolved["strong_blur_sigma"]),  # type: ignore[arg-type]
    ).to(dev)
    data = _on_device_if_it_fits(images.data, dev)
    for step in range(start, total):
        idx = order.indices(step).to(data.device, non_blocking=True)
        u8 = data[idx].to(dev, non_blocking=True)
        yield views(u8)


def _reference_batches(
    images: Sequence[Image.Image],
    batch: int,
    total: int,
    gen: torch.Generator,
    backbone: Backbone,
    config: AdaptConfig,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The reference regime: per-image PIL views in a shuffling DataLoader, moved to the device."""
    dev = backbone.device
    dataset = ReferenceDataset(list(images), ReferenceViews(backbone.image_size, backbone.mean, backbone.std))
    produced = 0
    while produced < total:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=config.reference_workers,
            generator=gen,
        )
        for weak, strong in loader:
            if produced >= total:
                return
            yield weak.to(dev), strong.to(dev)
            produced += 1


def _fingerprint(
    backbone: Backbone, class_names: Sequence[str], n: int, seed: int, resolved: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run."""
    keys = (
        "batch_size",
        "steps_per_epoch",
        "total_steps",
        "prompt_tokens",
        "learning_rate",
        "weight_decay",
        "label_smoothing",
        "data_path",
        "recipe",
        "strong_crop_scale",
        "strong_blur_sigma",
        "pseudo_label_balance",
        "balance_tau",
        "balance_prior_init",
    )
    return {
        "base_model": backbone.spec,
        "class_names": list(class_names),
        "images": n,
        "seed": seed,
        **{k: resolved[k] for k in keys},
    }


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    differ = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} != {current.get(k)!r}" for k in differ[:5])
        raise InvalidInputError(f"resume_from was made by a different run ({detail})")


def _cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (an optimiser's state dict holds live tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _on_device_if_it_fits(data: torch.Tensor, dev: torch.device, fraction: float = 0.25) -> torch.Tensor:
    """Keep the uint8 cache on the GPU when it takes under ``fraction`` of free memory, so batches
    are gathered there (no host gather, no pageable copy); otherwise batches come from pinned memory."""
    if dev.type != "cuda":
        return data
    free, _total = torch.cuda.mem_get_info(dev)
    if data.numel() * data.element_size() < fraction * free:
        return data.to(dev)
    return data


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    def ok(v: Any) -> bool:
        if isinstance(v, list | tuple):
            return all(isinstance(x, int | float) for x in v)
        return isinstance(v, str | int | float | bool) or v is None

    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if ok(v)}


class DistributionAlignment:
    """Debiased pseudo-labels: ``log p - tau * log(prior)``, where ``prior`` is the running mean of the
    teacher's class probabilities (ReMixMatch's distribution alignment at tau = 1; DebiasPL's adaptive
    debiasing). A teacher that gives most images to a few classes is pulled back towards a uniform
    marginal, so classes it rarely predicts still get pseudo-labels."""

    def __init__(self, num_classes: int, tau: float, momentum: float, device: torch.device) -> None:
        self.tau, self.momentum = float(tau), float(momentum)
        self.prior = torch.zeros(num_classes, device=device)
        self.started = False

    def warm_start(self, mean_probs: torch.Tensor) -> None:
        self.prior.copy_(mean_probs.to(self.prior.device))
        self.started = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=1)
        batch_mean = probs.mean(0)
        if self.started:
            self.prior.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
        else:
            self.prior.copy_(batch_mean)
            self.started = True
        return probs.clamp_min(1e-12).log() - self.tau * self.prior.clamp_min(1e-8).log()

    def state(self) -> list[float] | None:
        return self.prior.tolist() if self.started else None

    def load(self, prior: Sequence[float]) -> None:
        self.prior.copy_(torch.tensor(list(prior), device=self.prior.device))
        self.started = True


@torch.no_grad()
def _pool_probabilities(
    images: ImageCache,
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    backbone: Backbone,
    batch: int,
) -> torch.Tensor:
    """Mean teacher probabilities (weak views) over up to ``PRIOR_WARMUP_IMAGES`` evenly spaced
    images. It draws no random numbers, so the run's random streams are the same with or without it."""
    n = len(images)
    idx = torch.linspace(0, n - 1, min(n, PRIOR_WARMUP_IMAGES)).round().long().unique()
    views = ViewMaker(backbone.image_size, backbone.mean, backbone.std).to(backbone.device)
    total = torch.zeros(())
    chunk = max(batch, 64)
    for start in range(0, len(idx), chunk):
        u8 = images.data[idx[start : start + chunk]].to(backbone.device)
        total = total + teacher_logits(views.weak(u8)).float().softmax(dim=1).sum(0).cpu()
    return total / len(idx)
