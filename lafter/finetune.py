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
"""

from __future__ import annotations

import copy
import io
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
REFERENCE_EPOCHS = 50
REFERENCE_BATCH = 50
# "auto" epochs: enough passes that the run sees about this many image-views in total, between 1 and
# the reference's 50 epochs. 500 images -> 40 epochs (400 steps at batch 50); 20,000+ images -> 1 epoch.
AUTO_TARGET_SAMPLES = 20_000


@dataclass
class AdaptConfig:
    epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    prompt_tokens: int = 50
    label_smoothing: float = 0.1
    max_steps: int | None = None
    # "fast": uint8 cache + batched views on the device + autocast (bf16 on CUDA).
    # "reference": the reference code's regime (per-image PIL views on the CPU, fp32), for comparison.
    data_path: Literal["fast", "reference"] = "fast"
    reference_workers: int = 0
    compile: bool = False
    log_every: int = 10
    # Strong-view strength. The defaults are the reference's, made for 224 px photos; on small images
    # (e.g. 32 px) a blur of sigma 2 px and 20% crops destroy much of the evidence: offered as options.
    strong_crop_scale: tuple[float, float] = (0.2, 1.0)
    strong_blur_sigma: tuple[float, float] = (0.1, 2.0)
    # "none" is the method (hard argmax, no balancing). "align": distribution alignment of the
    # teacher (ReMixMatch-style): divide its probabilities by their running mean before the argmax,
    # so a teacher biased towards a few classes does not starve the others. An option, measured in
    # docs/benchmarks.md.
    pseudo_label_balance: Literal["none", "align"] = "none"
    balance_momentum: float = 0.99

    def resolve(self, num_images: int) -> dict[str, Any]:
        if num_images < 2:
            raise InvalidInputError("LaFTer needs at least 2 unlabeled images")
        if self.batch_size == "auto":
            batch = min(REFERENCE_BATCH, num_images)
        else:
            batch = int(self.batch_size)
            if batch < 1:
                raise InvalidInputError("batch_size must be >= 1")
            batch = min(batch, num_images)
        if self.epochs == "auto":
            epochs = max(1, min(REFERENCE_EPOCHS, math.ceil(AUTO_TARGET_SAMPLES / num_images)))
        else:
            epochs = int(self.epochs)
            if epochs < 1:
                raise InvalidInputError("epochs must be >= 1")
        steps_per_epoch = num_images // batch  # drop_last, as the reference's loader
        total = epochs * steps_per_epoch
        if self.max_steps is not None:
            total = min(total, int(self.max_steps))
        return {
            **asdict(self),
            "epochs": epochs,
            "batch_size": batch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
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

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdaptCheckpoint:
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInputError(f"not a stage-2 checkpoint: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidInputError("not a stage-2 checkpoint")
        return cls.from_dict(loaded)


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
    resolved = config.resolve(n)
    dev = backbone.device
    amp_dtype = backbone.amp_dtype if config.data_path == "fast" else None
    resolved["precision"] = precision_name(amp_dtype)
    resolved["device"] = str(dev)
    resolved["seed"] = seed
    total = int(resolved["total_steps"])
    batch = int(resolved["batch_size"])
    fingerprint = _fingerprint(backbone, class_names, n, seed, resolved)
    if resume_from is not None:
        if config.data_path != "fast":
            raise InvalidInputError("resume_from needs the fast data path")
        _check_fingerprint(resume_from.fingerprint, fingerprint)

    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        state = LafterState(backbone, text_head, config.prompt_tokens, gen).to(dev)
        frozen_head = copy.deepcopy(text_head).to(dev).requires_grad_(False)
        resolved["trainable_parameters"] = count_parameters(state)
        base_params = sum(p.numel() for p in backbone.visual.parameters())
        log.info(
            "LaFTer: trainable %d of %d image-tower parameters (%.4f%%); %d steps of batch %d over %d images",
            resolved["trainable_parameters"],
            base_params,
            100.0 * resolved["trainable_parameters"] / max(1, base_params),
            total,
            batch,
            n,
        )
        opt = torch.optim.AdamW(
            state.param_groups(config.weight_decay), lr=config.learning_rate, fused=dev.type == "cuda"
        )
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        tower = PromptedTower(backbone.visual)

        def encode(x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
            return tower(x, prompts, state.ln_overrides())

        if config.compile:
            encode = torch.compile(encode)

        prior = torch.zeros(len(class_names), device=dev)  # running mean teacher probabilities
        prior_seen = [False]

        def train_step(weak: torch.Tensor, strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with (
                torch.no_grad(),
                torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
            ):
                teacher = nn.functional.normalize(encode(weak, None).float(), dim=-1)
                teacher_logits = frozen_head(teacher)
                if config.pseudo_label_balance == "align":
                    probs = teacher_logits.softmax(dim=1)
                    mean_probs = probs.mean(0)
                    if prior_seen[0]:
                        prior.mul_(config.balance_momentum).add_(
                            mean_probs, alpha=1 - config.balance_momentum
                        )
                    else:
                        prior.copy_(mean_probs)
                        prior_seen[0] = True
                    teacher_logits = probs.log() - prior.clamp_min(1e-8).log()
                pseudo = teacher_logits.argmax(dim=1)
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = state.head(encode(strong, state.prompts))
            loss = loss_fn(logits.float(), pseudo)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach(), pseudo

        histogram = torch.zeros(len(class_names), dtype=torch.long, device=dev)
        window_hist = torch.zeros_like(histogram)
        ones = torch.ones(batch, dtype=torch.long, device=dev)
        history: list[dict[str, Any]] = []
        order = _EpochOrder(n, batch, int(resolved["steps_per_epoch"]), gen)
        step = 0
        if resume_from is not None:
            state.load_state_dict(resume_from.trainable)
            opt.load_state_dict(resume_from.optimizer)
            order.restore(resume_from.order_rng)
            torch.set_rng_state(resume_from.cpu_rng)
            if dev.type == "cuda" and resume_from.device_rng is not None:
                torch.cuda.set_rng_state(resume_from.device_rng, dev)
            histogram += torch.tensor(resume_from.histogram, dtype=torch.long, device=dev)
            history = [dict(h) for h in resume_from.history]
            step = resume_from.step
            if resume_from.teacher_prior is not None:
                prior.copy_(torch.tensor(resume_from.teacher_prior, device=dev))
                prior_seen[0] = True
            log.info("LaFTer: resuming at step %d of %d", step, total)
        start_step = step

        def snapshot() -> AdaptCheckpoint:
            return AdaptCheckpoint(
                step=step,
                fingerprint=fingerprint,
                trainable={k: v.detach().cpu().clone() for k, v in state.state_dict().items()},
                optimizer=_cpu_copy(opt.state_dict()),
                order_rng=order.rng_for(step),
                cpu_rng=torch.get_rng_state(),
                device_rng=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                histogram=histogram.tolist(),
                history=[dict(h) for h in history],
                teacher_prior=prior.tolist() if prior_seen[0] else None,
            )

        start = time.perf_counter()
        window_start, window_images, window_steps = start, 0, 0
        loss_sum = torch.zeros((), device=dev)
        if isinstance(images, ImageCache):
            batches = _cached_batches(images, total, order, dev, backbone, start_step, config)
        else:
            batches = _reference_batches(images, batch, total, gen, backbone, config)
        for weak, strong in batches:
            check_cancel(should_cancel, STAGE, step)
            loss, pseudo = train_step(weak, strong)
            step += 1
            loss_sum += loss
            # scatter, not bincount: bincount on CUDA reads the max back to the host (a sync per step)
            counts = torch.zeros_like(histogram).index_add_(0, pseudo, ones[: pseudo.shape[0]])
            histogram += counts
            window_hist += counts
            window_images += int(pseudo.shape[0])
            window_steps += 1
            if progress is not None and (step % config.log_every == 0 or step == total):
                now = time.perf_counter()
                metrics = {
                    "loss": float(loss_sum.item()) / window_steps,
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                    "pseudo_label_histogram": window_hist.tolist(),
                    "epoch": (step - 1) // max(1, resolved["steps_per_epoch"]) + 1,
                }
                history.append({"step": step, **metrics})
                progress(ProgressEvent(STAGE, step, total, metrics))
                loss_sum.zero_()
                window_hist.zero_()
                window_start, window_images, window_steps = now, 0, 0
            if checkpoint is not None:
                checkpoint(step, total, snapshot)
        seconds = time.perf_counter() - start

    adapted = AdaptedModel(
        base_spec=backbone.spec,
        class_names=list(class_names),
        tensors=state.export(),
        kind="lafter",
        normalize_features=False,
        metadata={"hyperparameters": _jsonable(resolved), "steps": step},
    )
    return AdaptResult(
        model=adapted,
        steps=step,
        epochs=int(resolved["epochs"]),
        resolved=resolved,
        history=history,
        pseudo_label_histogram=histogram.tolist(),
        images_per_s=(step - start_step) * batch / max(seconds, 1e-9),
        seconds=seconds,
        resumed_from_step=start_step,
    )


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
    config: AdaptConfig,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(weak, strong) normalised view batches on ``dev`` for steps ``start .. total - 1``."""
    views = ViewMaker(
        backbone.image_size, backbone.mean, backbone.std, config.strong_crop_scale, config.strong_blur_sigma
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
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool) or v is None}
