"""Stage-2 data path: decode each image once into a uint8 cache, build views in batches on the device.

``ImageCache`` holds every image as a ``uint8`` square of ``size`` pixels (short side resized with
bicubic, centre crop), decoded once, in parallel threads. ``ViewMaker`` builds the two views of a whole
batch on the training device with per-sample random parameters (kornia):

- weak: the cached square itself (= resize short side + centre crop) + CLIP normalisation;
- strong: RandomResizedCrop(scale 0.2-1.0), horizontal flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p=0.8, grayscale with p=0.2, Gaussian blur with sigma ~ U[0.1, 2.0] always, CLIP normalisation.

One documented difference from the reference's per-image PIL pipeline: random crops are drawn from the
cached centre square rather than the full frame (identical for square images).
``ReferenceViews`` is that reference pipeline (per-sample PIL + torchvision), kept for the
benchmark's speed ratio and for A/B checks.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from lafter.errors import InvalidInputError

log = logging.getLogger(__name__)

ImageSource = Image.Image | str | Path | bytes


def to_square_uint8(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop: the CLIP eval transform, as uint8 HWC."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    # the same integer arithmetic as torchvision's Resize + CenterCrop, so the cache equals the reference
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def open_image(source: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Open a path, bytes or PIL image. ``draft_size`` lets JPEG decode at a reduced scale
    (still >= the size asked for), which is most of the decode time for large photos."""
    if isinstance(source, Image.Image):
        return source
    img = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img


@dataclass
class ImageCache:
    """All images of a dataset, decoded once: ``data`` is ``uint8 [N, 3, size, size]`` (CPU, pinned
    when CUDA is present so host-to-device copies overlap)."""

    data: torch.Tensor
    size: int
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @classmethod
    def from_sources(
        cls,
        sources: Sequence[ImageSource],
        size: int,
        names: Sequence[str] | None = None,
        workers: int = 4,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ImageCache:
        if len(sources) == 0:
            raise InvalidInputError("no images to cache")
        out = np.empty((len(sources), size, size, 3), dtype=np.uint8)

        def work(i: int) -> None:
            try:
                out[i] = to_square_uint8(open_image(sources[i], draft_size=size), size)
            except Exception as exc:  # report which image, not a bare PIL error
                label = names[i] if names is not None else str(sources[i])[:200]
                raise InvalidInputError(f"could not decode image {label!r}: {exc}") from exc

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for done, _ in enumerate(pool.map(work, range(len(sources))), start=1):
                if on_progress is not None and (done % 256 == 0 or done == len(sources)):
                    on_progress(done, len(sources))
        data = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        if torch.cuda.is_available():
            data = data.pin_memory()
        return cls(data=data, size=size, names=list(names) if names is not None else [])

    @classmethod
    def from_pil(cls, images: Sequence[Image.Image], size: int, workers: int = 4) -> ImageCache:
        return cls.from_sources(images, size, workers=workers)

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], size: int, workers: int = 4) -> ImageCache:
        return cls.from_sources([str(p) for p in paths], size, names=[str(p) for p in paths], workers=workers)


def blur_kernel_size(image_size: int, max_sigma: float = 2.0) -> int:
    """Odd kernel covering +-3 sigma at the largest sigma (13 for the reference's 2.0), capped below
    the image size."""
    k = 2 * max(1, math.ceil(3 * max_sigma)) + 1
    return min(k, image_size - 1 if image_size % 2 == 0 else image_size)


class ViewMaker(torch.nn.Module):
    """Weak and strong views of a uint8 batch, on whatever device the batch is on."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.strong_aug = K.AugmentationSequential(
            K.RandomResizedCrop((image_size, image_size), scale=crop_scale, resample="bilinear"),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur(blur_kernel_size(image_size, blur_sigma[1]), sigma=blur_sigma, p=1.0),
        )

    def _to_float(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.float().div_(255.0)
        if x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            ).clamp_(0, 1)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def weak(self, u8: torch.Tensor) -> torch.Tensor:
        return self.normalize(self._to_float(u8))

    def strong(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.float().div_(255.0)
        return self.normalize(self.strong_aug(x).clamp_(0, 1))

    def forward(self, u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(u8), self.strong(u8)


class _PILGaussianBlur:
    """The reference's blur: PIL Gaussian blur, radius sigma ~ U[0.1, 2.0]."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class ReferenceViews:
    """The reference regime's per-image PIL pipeline (torchvision transforms on the CPU)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        norm = T.Normalize(mean, std)
        self.weak = T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
                norm,
            ]
        )
        self.strong = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                _PILGaussianBlur(),
                T.ToTensor(),
                norm,
            ]
        )

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = img.convert("RGB")
        return self.weak(img), self.strong(img)


class ReferenceDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, sources: Sequence[ImageSource], views: ReferenceViews) -> None:
        self.sources = sources
        self.views = views

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(open_image(self.sources[i]))


def iter_image_files(folder: str | Path, recursive: bool = True) -> Iterable[Path]:
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    root = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in exts)
