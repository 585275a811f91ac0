"""Upload validation, independent of HTTP and the database: unpack archives, decode every image,
hash it, and say per file why it was refused. Nothing here writes anywhere."""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})

# Codes a rejection can carry; the size ones are answered 413 when nothing at all was accepted.
SIZE_CODES = frozenset({"file_too_large", "image_too_many_pixels", "archive_too_large"})


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_image_pixels: int
    min_image_side: int
    max_archive_members: int
    max_archive_bytes: int


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
    """Accept a file only if it really decodes as an image within the pixel limit."""
    name, data = candidate.filename, candidate.data
    if not data:
        return Rejection(name, "empty_file", "the file is empty")
    if len(data) > limits.max_file_bytes:
        return Rejection(
            name, "file_too_large", f"{len(data)} bytes exceeds the per-file limit of {limits.max_file_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                width, height = img.size
                if fmt not in ALLOWED_FORMATS:
                    return Rejection(
                        name, "unsupported_image_format", f"{fmt or 'unknown'} images are not accepted"
                    )
                # Check the header's size before decoding, so a decompression bomb is never expanded.
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
                img.load()
    except UnidentifiedImageError:
        return Rejection(name, "not_an_image", "the file is not an image in a supported format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Rejection(name, "image_too_many_pixels", "the image expands to too many pixels")
    except Exception as exc:  # truncated or corrupt data surfaces as many exception types
        return Rejection(name, "image_corrupt", f"the image could not be decoded: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    return DecodedImage(name, data, digest, fmt, width, height, candidate.label)


def looks_like_archive(filename: str, head: bytes) -> str | None:
    lower = filename.lower()
    if head.startswith(b"PK\x03\x04") or lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    if head[:2] == b"\x1f\x8b" or (len(head) > 262 and head[257:262] == b"ustar"):
        return "tar"
    return None


def _label_from_path(path: str) -> str | None:
    parent = posixpath.basename(posixpath.dirname(path))
    return parent or None


def _skip_member(path: str) -> bool:
    base = posixpath.basename(path)
    return not base or base.startswith(".") or "__MACOSX" in path.split("/")


def iter_archive(
    filename: str, fileobj: IO[bytes], kind: str, limits: Limits, *, labelled: bool
) -> Iterator[Candidate | Rejection]:
    """Yield the archive's files as candidates. ``labelled``: the parent folder names the class."""
    members = 0
    total = 0

    def member(path: str, size: int, read: Callable[[int], bytes]) -> Candidate | Rejection | None:
        nonlocal members, total
        shown = f"{filename}/{path}"
        if _skip_member(path):
            return None
        members += 1
        if members > limits.max_archive_members:
            raise _ArchiveLimit(
                Rejection(
                    filename,
                    "archive_too_large",
                    f"more than {limits.max_archive_members} files in the archive",
                )
            )
        if size > limits.max_file_bytes:
            return Rejection(shown, "file_too_large", f"{size} bytes exceeds the per-file limit")
        total += size
        if total > limits.max_archive_bytes:
            raise _ArchiveLimit(
                Rejection(
                    filename, "archive_too_large", f"unpacks to more than {limits.max_archive_bytes} bytes"
                )
            )
        data = read(limits.max_file_bytes + 1)  # the header's size may lie: never read past the limit
        label = _label_from_path(path) if labelled else None
        return Candidate(shown, data, label)

    try:
        if kind == "zip":
            with zipfile.ZipFile(fileobj) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    with zf.open(info) as fh:
                        item = member(info.filename, info.file_size, fh.read)
                    if item is not None:
                        yield item
        else:
            with tarfile.open(fileobj=fileobj, mode="r:*") as tf:
                for tinfo in tf:
                    if not tinfo.isfile():
                        continue  # links, devices and folders are never followed
                    extracted = tf.extractfile(tinfo)
                    if extracted is None:
                        continue
                    item = member(tinfo.name, tinfo.size, extracted.read)
                    if item is not None:
                        yield item
    except _ArchiveLimit as exc:
        yield exc.rejection
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as exc:
        yield Rejection(filename, "archive_corrupt", f"the archive could not be read: {exc}")


class _ArchiveLimit(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection
