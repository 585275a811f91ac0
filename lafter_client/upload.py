"""Turning a folder (or a list of files) into upload requests: image files packed into plain tar
archives of bounded size and count, so 100,000 photos take a few hundred requests instead of
100,000, and no request outgrows the server's limit. Archives are built in a spooled temporary
file: memory stays bounded whatever the chunk size."""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_CHUNK_FILES = 1000


@dataclass(frozen=True)
class LocalFile:
    path: Path
    name: str  # as the service will see it: the path relative to the uploaded folder
    size: int


@dataclass
class Chunk:
    """Files sent in one request: several images packed into one tar, or one file as it is (an
    archive the caller made, or a lone image)."""

    files: list[LocalFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def collect(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[LocalFile]:
    """The files to upload: a folder is walked (images only, hidden files and folders skipped,
    sorted, so a retried upload packs the same chunks); files named explicitly are always sent."""
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    found: list[LocalFile] = []
    for item in sources:
        path = Path(item)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    full = Path(dirpath) / name
                    found.append(LocalFile(full, full.relative_to(path).as_posix(), full.stat().st_size))
        elif path.is_file():
            found.append(LocalFile(path, path.name, path.stat().st_size))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def chunks(files: Iterable[LocalFile], max_bytes: int, max_files: int) -> Iterator[Chunk]:
    """Images in order, grouped while a group stays within ``max_bytes`` and ``max_files``; an
    archive, or an image bigger than ``max_bytes`` on its own, goes in a chunk of its own."""
    current = Chunk()
    for f in files:
        alone = is_archive(f.name) or f.size > max_bytes
        if current.files and (alone or current.size + f.size > max_bytes or len(current.files) >= max_files):
            yield current
            current = Chunk()
        current.files.append(f)
        if alone:
            yield current
            current = Chunk()
    if current.files:
        yield current


def pack(chunk: Chunk) -> IO[bytes]:
    """The chunk as one plain tar (images are compressed already), members named by ``name``."""
    # Handed to the caller open, which closes it once the request is sent.
    out = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in chunk.files:
            info = tarfile.TarInfo(f.name)
            info.size = f.size
            info.mtime = int(time.time())
            with f.path.open("rb") as src:
                tar.addfile(info, src)
    out.seek(0)
    return out  # type: ignore[return-value]


class ProgressBar:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, one line per update
    elsewhere (a CI log)."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool = True, label: str = "upload"):
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = 0
        self.enabled = enabled
        self.label = label
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()

    def advance(self, files: int, size: int) -> None:
        self.files += files
        self.bytes += size
        if not self.enabled:
            return
        fraction = self.bytes / self.total_bytes if self.total_bytes else 1.0
        width = 30
        filled = round(width * fraction)
        rate = self.bytes / max(time.monotonic() - self.started, 1e-6) / 1e6
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% "
            f"{self.files}/{self.total_files} files, {self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
            f"{rate:.1f} MB/s"
        )
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
