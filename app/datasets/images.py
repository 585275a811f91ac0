"""Image uploads, independent of HTTP and the database: decode every file completely, hash it, and
say why it was refused. The types every upload check shares (``Limits``, ``Candidate``,
``Rejection``) live here; archives are ``app.datasets.archives``.

Hostile input is bounded before it costs memory or CPU: the header's width x height is checked
before any pixel is decoded; then ``verify()`` (structure, checksums) and a full ``load()``, so a
truncated file is refused, not padded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from lafter.views import to_square_uint8

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
# Image.open tries only these decoders: no exotic format parser ever sees an upload.
_OPEN_FORMATS = tuple(sorted(ALLOWED_FORMATS - {"MPO"}))  # MPO comes out of the JPEG plugin

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".mpo",
)  # fmt: skip

# Codes a rejection can carry that are about size; answered 413 when nothing at all was accepted.
SIZE_CODES = frozenset(
    {
        "file_too_large",
        "image_too_many_pixels",
        "archive_too_large",
        "archive_bomb",
        "archive_too_many_members",
        "too_many_files",
    }
)


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_image_pixels: int
    min_image_side: int
    max_archive_members: int
    max_archive_bytes: int
    max_archive_ratio: float = 100.0


@dataclass(frozen=True)
class Candidate:
    """One file's bytes before decoding, with the label (evaluation split) it carries, if any."""

    filename: str
    data: bytes
    label: str | None


@dataclass(frozen=True)
class Rejection:
    filename: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"filename": self.filename, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class DecodedImage:
    filename: str
    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    label: str | None


def decode_image(candidate: Candidate, limits: Limits) -> DecodedImage | Rejection:
    """Accept a file only if it really decodes, completely, as an image within the pixel limit."""
    name, data = candidate.filename, candidate.data
    refused = _bytes_rejection(name, data, limits)
    if refused is not None:
        return refused
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the one that counts; Pillow's (2x its warning level)
            # still raises DecompressionBombError as a backstop.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
                fmt = (img.format or "").upper()
                width, height = img.size
                refused = _header_rejection(name, fmt, width, height, limits)
                if refused is not None:
                    return refused
                img.verify()  # chunk structure and checksums (a PNG cut after its pixels fails here)
            # verify() leaves the image unusable: decode every pixel from a fresh open.
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
                if img.size != (width, height):
                    raise OSError("the image changed size between reads")
                img.load()
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        return _decode_rejection(name, exc)
    digest = hashlib.sha256(data).hexdigest()
    return DecodedImage(name, data, digest, fmt, width, height, candidate.label)


def _bytes_rejection(name: str, data: bytes, limits: Limits) -> Rejection | None:
    """The checks before Pillow sees the bytes: empty, over the per-file limit."""
    if not data:
        return Rejection(name, "empty_file", "the file is empty")
    if len(data) > limits.max_file_bytes:
        return Rejection(
            name, "file_too_large", f"{len(data)} bytes exceeds the per-file limit of {limits.max_file_bytes}"
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some import flipped Pillow's global: truncated files would decode as grey padding.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; refusing to decode uploads")
    return None


def _decode_rejection(name: str, exc: Exception) -> Rejection:
    """What a failed open or decode means to the caller."""
    if isinstance(exc, UnidentifiedImageError):
        return Rejection(name, "not_an_image", "the file is not an image in a supported format")
    if isinstance(exc, Image.DecompressionBombError):
        return Rejection(name, "image_too_many_pixels", "the image header declares too many pixels")
    return Rejection(name, "image_corrupt", f"the image could not be decoded: {exc}")


def _header_rejection(name: str, fmt: str, width: int, height: int, limits: Limits) -> Rejection | None:
    """The checks the header alone allows, before any pixel is decoded (a decompression bomb never
    expands): format, pixel count, smallest side."""
    if fmt not in ALLOWED_FORMATS:
        return Rejection(name, "unsupported_image_format", f"{fmt or 'unknown'} images are not accepted")
    if width * height > limits.max_image_pixels:
        return Rejection(
            name,
            "image_too_many_pixels",
            f"{width}x{height} exceeds the limit of {limits.max_image_pixels} pixels",
        )
    if min(width, height) < limits.min_image_side:
        return Rejection(
            name, "image_too_small", f"{width}x{height} is smaller than {limits.min_image_side}px"
        )
    return None


def decode_for_prediction(candidate: Candidate, limits: Limits, size: int) -> np.ndarray | Rejection:
    """An image to classify, decoded once into the model's input square (``uint8 [size, size, 3]``).

    The same rules as ``decode_image`` (size, format, pixel limit before decoding, every pixel decoded,
    so a truncated file is refused), without what only stored uploads need: no second structural pass
    (``verify``) and no content hash. JPEGs decode at reduced scale when they are larger than the
    model's input (Pillow's draft mode), as the training cache does."""
    name, data = candidate.filename, candidate.data
    refused = _bytes_rejection(name, data, limits)
    if refused is not None:
        return refused
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
                fmt = (img.format or "").upper()
                refused = _header_rejection(name, fmt, img.size[0], img.size[1], limits)
                if refused is not None:
                    return refused
                if fmt in ("JPEG", "MPO"):
                    img.draft("RGB", (size, size))
                img.load()
                return to_square_uint8(img, size)
    except Exception as exc:
        return _decode_rejection(name, exc)


def thumbnail_jpeg(data: bytes, size: int, quality: int = 80) -> bytes:
    """A stored image as a JPEG whose longer side is at most ``size`` (never enlarged). Only images
    that passed ``decode_image`` are stored, so this decodes trusted-size input; JPEGs decode at
    reduced scale first (Pillow's draft mode), so a 12-megapixel photo costs a fraction of a full
    decode. Transparent images are laid on white, as a browser shows them on a light page."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
            if (img.format or "").upper() in ("JPEG", "MPO"):
                img.draft("RGB", (size, size))
            img.thumbnail((size, size))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
            else:
                flat = img.convert("RGB")
    out = io.BytesIO()
    flat.save(out, format="JPEG", quality=quality)
    return out.getvalue()
