"""Archive uploads, independent of HTTP and the database: unpack zip and tar archives member by
member into ``Candidate`` files (decoded by ``app.datasets.images``), and say per member why it was
refused. Nothing here writes anywhere: member names are reported, never used as paths.

Hostile input is bounded before it costs memory or CPU: each read is capped at the per-file limit.
Zip: the central directory's entries are counted before ``zipfile`` builds an object per entry,
declared sizes and compression ratios are checked before a member is inflated. Tar: the (gzip,
bzip2, xz) stream is decompressed through a counter that stops at the unpacked-bytes limit or the
ratio limit; oversized tar metadata headers and sparse members are refused before ``tarfile``
buffers them. Links, devices, ``..`` and absolute names, and archives inside archives are refused
per member.

Two private hooks of the standard library are used, each pinned by a test
(tests/service/test_archives.py) so that a Python upgrade that changes them fails loudly:
``zipfile._EndRecData`` (the parser ``ZipFile`` itself uses for the end-of-directory record) and
``tarfile.TarInfo._proc_member`` (tarfile's hook for ``TarInfo`` subclasses).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO, Any, cast
from zipfile import _EndRecData  # type: ignore[attr-defined]  # the very parser ZipFile uses

from app.datasets.images import IMAGE_EXTENSIONS, Candidate, Limits, Rejection

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_EXTENSIONS = (
    *TAR_EXTENSIONS, ".zip", ".gz", ".bz2", ".xz", ".lzma", ".7z", ".rar", ".zst", ".z", ".cab", ".jar",
)  # fmt: skip
_ARCHIVE_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd",
)  # fmt: skip

# Below this many unpacked bytes the compression ratio is not judged: a small flat BMP deflates
# 100x and is harmless; a bomb needs volume to hurt.
RATIO_GRACE_BYTES = 1024 * 1024
# The most a pax or GNU long-name header may hold (tarfile reads it into memory in one piece).
MAX_TAR_HEADER_BYTES = 64 * 1024
# Central-directory bytes allowed per permitted member (name, extra fields, comment): zipfile
# reads the whole directory into memory at once.
_ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024
_READ_CHUNK = 64 * 1024


def looks_like_archive(filename: str, head: bytes) -> str | None:
    """``zip``, ``tar`` (possibly compressed) or None (decode it as an image). A file named like an
    image is never unpacked, whatever its bytes: a zip renamed ``.jpg`` is ``not_an_image``."""
    lower = filename.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or lower.endswith(".zip"):
        return "zip"
    if lower.endswith(TAR_EXTENSIONS) or _compression(head) is not None or _is_ustar(head):
        return "tar"
    return None


def _compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


def _is_ustar(head: bytes) -> bool:
    return len(head) > 262 and head[257:262] == b"ustar"


def _is_archive(path: str, head: bytes) -> bool:
    return path.lower().endswith(ARCHIVE_EXTENSIONS) or head.startswith(_ARCHIVE_MAGIC) or _is_ustar(head)


def _label_from_path(path: str) -> str | None:
    parent = posixpath.basename(posixpath.dirname(path))
    return parent or None


def _skip_member(path: str) -> bool:
    base = posixpath.basename(path)
    return not base or base.startswith(".") or "__MACOSX" in path.split("/")


_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_path(path: str) -> str | None:
    """Why a member name could land outside a folder it were extracted to, or None if it could not."""
    if "\x00" in path:
        return "contains a NUL byte"
    norm = path.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        return "is an absolute path"
    if ".." in norm.split("/"):
        return "has a '..' component"
    return None


def _ratio_exceeded(unpacked: int, packed: int, limits: Limits) -> bool:
    return unpacked > RATIO_GRACE_BYTES and unpacked > limits.max_archive_ratio * max(packed, 1)


class _ArchiveStop(Exception):
    """Raised while reading an archive: the rest of it is refused with this rejection."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


def iter_archive(
    filename: str, fileobj: IO[bytes], kind: str, limits: Limits, *, labelled: bool
) -> Iterator[Candidate | Rejection]:
    """Yield the archive's files as candidates, or rejections, one member at a time (at most
    ``max_file_bytes + 1`` bytes of one member in memory). ``labelled``: the parent folder names the
    class. Whatever stops the archive midway comes last, after the members already yielded."""
    members = _zip_members if kind == "zip" else _tar_members
    try:
        yield from members(filename, fileobj, limits, labelled)
    except _ArchiveStop as exc:
        yield exc.rejection
    except RecursionError:
        yield Rejection(filename, "archive_corrupt", "the archive's headers nest too deeply")
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        OSError,
        ValueError,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
        struct.error,
    ) as exc:
        yield Rejection(filename, "archive_corrupt", f"the archive could not be read: {exc}")


def _member(filename: str, path: str, data: bytes, labelled: bool) -> Candidate | Rejection:
    """A member whose bytes were read: an archive inside the archive is refused, never unpacked."""
    shown = f"{filename}/{path}"
    if _is_archive(path, data[:512]):
        return Rejection(shown, "archive_nested", "archives inside archives are not unpacked")
    return Candidate(shown, data, _label_from_path(path) if labelled else None)


def _too_many(filename: str, limits: Limits, what: str) -> _ArchiveStop:
    return _ArchiveStop(
        Rejection(
            filename,
            "archive_too_many_members",
            f"{what} more than {limits.max_archive_members} entries (LAFTER_MAX_ARCHIVE_MEMBERS); "
            "split it into several archives",
        )
    )


def _too_large(filename: str, limits: Limits, what: str) -> _ArchiveStop:
    return _ArchiveStop(
        Rejection(
            filename,
            "archive_too_large",
            f"{what} more than {limits.max_archive_bytes} bytes (LAFTER_MAX_ARCHIVE_BYTES)",
        )
    )


def _bomb(filename: str, limits: Limits, unpacked: int, packed: int) -> Rejection:
    return Rejection(
        filename,
        "archive_bomb",
        f"{packed} compressed bytes unpack to {unpacked}: more than {limits.max_archive_ratio:g}x "
        "(LAFTER_MAX_ARCHIVE_RATIO)",
    )


# --- zip --------------------------------------------------------------------------------------


def _count_zip_directory(filename: str, fileobj: IO[bytes], limits: Limits) -> None:
    """Count the central directory's entries the way ``ZipFile`` will walk it, before it reads the
    directory into memory and builds one object per entry (a directory of millions of tiny entries
    would cost gigabytes), and refuse the archive above the member limit."""
    endrec = _EndRecData(fileobj)
    if not endrec:
        raise zipfile.BadZipFile("File is not a zip file")
    size_cd, location = endrec[5], endrec[9]
    start = location - size_cd  # ZipFile: offset + concat, where concat = location - size - offset
    if endrec[0] == b"PK\x06\x06":  # zip64: its end record (56 bytes) and locator (20) come between
        start -= 56 + 20
    budget = 1024 * 1024 + limits.max_archive_members * _ZIP_DIRECTORY_BYTES_PER_MEMBER
    if size_cd > budget:
        raise _too_many(filename, limits, f"its directory of {size_cd} bytes holds")
    if start < 0:
        raise zipfile.BadZipFile("Bad offset for central directory")
    fileobj.seek(start)
    total = entries = 0
    while total < size_cd:
        head = fileobj.read(46)
        if len(head) != 46 or head[:4] != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        name_len, extra_len, comment_len = struct.unpack_from("<3H", head, 28)
        fileobj.seek(name_len + extra_len + comment_len, io.SEEK_CUR)
        total += 46 + name_len + extra_len + comment_len
        entries += 1
        if entries > limits.max_archive_members:
            raise _too_many(filename, limits, "it has")
    fileobj.seek(0)


def _zip_special(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "is a device, FIFO or socket, not a regular file"
    return None


def _zip_members(
    filename: str, fileobj: IO[bytes], limits: Limits, labelled: bool
) -> Iterator[Candidate | Rejection]:
    _count_zip_directory(filename, fileobj, limits)
    with zipfile.ZipFile(fileobj) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise _too_many(filename, limits, "it has")
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_archive_bytes:
            raise _too_large(filename, limits, f"its members declare {declared} bytes,")
        unpacked = 0
        for info in infos:
            path = info.filename
            shown = f"{filename}/{path}"
            why = unsafe_path(path)
            if why is not None:
                yield Rejection(shown, "archive_unsafe_path", f"the member name {why}")
                continue
            special = _zip_special(info)
            if special is not None:
                yield Rejection(shown, "archive_link", f"the member {special}; only regular files are read")
                continue
            if info.is_dir() or _skip_member(path):
                continue
            if info.file_size > limits.max_file_bytes:
                yield Rejection(
                    shown,
                    "file_too_large",
                    f"{info.file_size} bytes exceeds the per-file limit of {limits.max_file_bytes}",
                )
                continue
            if _ratio_exceeded(info.file_size, info.compress_size, limits):
                yield _bomb(shown, limits, info.file_size, info.compress_size)
                continue
            if info.flag_bits & 0x1:
                yield Rejection(shown, "archive_corrupt", "the member is encrypted")
                continue
            try:
                with zf.open(info) as fh:
                    # ZipFile never inflates past the declared size (and checks the CRC there).
                    data = fh.read(limits.max_file_bytes + 1)
            except (
                zipfile.BadZipFile,
                zlib.error,
                NotImplementedError,
                EOFError,
                OSError,
                ValueError,
            ) as exc:
                yield Rejection(shown, "archive_corrupt", f"the member could not be read: {exc}")
                continue
            unpacked += len(data)
            if unpacked > limits.max_archive_bytes:
                raise _too_large(filename, limits, "it unpacks to")
            yield _member(filename, path, data, labelled)


# --- tar --------------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """The raw upload, counting the (compressed) bytes read from it."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(min(len(buffer), _READ_CHUNK))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


class _BudgetedStream:
    """The decompressed tar stream: stops at the unpacked-bytes limit or the ratio limit, so a
    gzip bomb costs at most ``max_archive_bytes`` of CPU and never more than a chunk of memory."""

    def __init__(
        self, inner: io.RawIOBase | io.BufferedIOBase, packed: _CountingReader, filename: str, limits: Limits
    ) -> None:
        self.inner = inner
        self.packed = packed
        self.filename = filename
        self.limits = limits
        self.unpacked = 0

    def read(self, size: int = -1) -> bytes:
        want = _READ_CHUNK if size is None or size < 0 else min(size, _READ_CHUNK)
        data = self.inner.read(want) or b""
        self.unpacked += len(data)
        if self.unpacked > self.limits.max_archive_bytes:
            raise _too_large(self.filename, self.limits, "it unpacks to")
        if self.inner is not self.packed and _ratio_exceeded(self.unpacked, self.packed.count, self.limits):
            raise _ArchiveStop(_bomb(self.filename, self.limits, self.unpacked, self.packed.count))
        return data


class _TarRefused(tarfile.TarError):
    pass


_TAR_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile buffers them, what would make it allocate in proportion to
    attacker-chosen numbers: huge pax / long-name headers and sparse-file maps (sparse members also
    expand holes into bytes that no stream counter sees). ``_proc_member`` is tarfile's documented
    hook for subclasses."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _TarRefused("sparse members are not accepted")
        if self.type in _TAR_META_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise _TarRefused(f"a {self.size}-byte metadata header exceeds {MAX_TAR_HEADER_BYTES} bytes")
        info: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        if info.sparse is not None:
            raise _TarRefused("sparse members are not accepted")
        return info

    def _proc_gnusparse_10(self, next_: Any, pax_headers: Any, tarfile_: Any) -> None:
        raise _TarRefused("sparse members are not accepted")


def _tar_special(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return f"is a symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"is a hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "is a device"
    if info.isfifo():
        return "is a FIFO"
    if not info.isdir() and not info.isfile():
        return f"is not a regular file (type {info.type!r})"
    return None


def _tar_members(
    filename: str, fileobj: IO[bytes], limits: Limits, labelled: bool
) -> Iterator[Candidate | Rejection]:
    head = fileobj.read(6)
    fileobj.seek(0)
    packed = _CountingReader(fileobj)
    entries = 0
    unpacked = 0
    with contextlib.ExitStack() as stack:
        compression = _compression(head)
        inner: io.RawIOBase | io.BufferedIOBase = packed
        if compression == "gz":
            inner = stack.enter_context(gzip.GzipFile(fileobj=packed, mode="rb"))
        elif compression == "bz2":
            inner = stack.enter_context(bz2.BZ2File(packed))
        elif compression == "xz":
            inner = stack.enter_context(lzma.LZMAFile(cast(IO[bytes], packed)))
        stream = _BudgetedStream(inner, packed, filename, limits)
        # Stream mode: strictly forward, one member at a time, skipped data read and thrown away.
        tf = stack.enter_context(tarfile.open(fileobj=stream, mode="r|", tarinfo=_SafeTarInfo))  # type: ignore[call-overload]
        while True:
            try:
                info = tf.next()
            except _TarRefused as exc:
                raise _ArchiveStop(
                    Rejection(filename, "archive_corrupt", f"the archive could not be read: {exc}")
                ) from exc
            if info is None:
                break
            tf.members.clear()  # tarfile keeps every header it has seen; we never look back
            entries += 1
            if entries > limits.max_archive_members:
                raise _too_many(filename, limits, "it has")
            path = info.name
            shown = f"{filename}/{path}"
            why = unsafe_path(path)
            if why is not None:
                yield Rejection(shown, "archive_unsafe_path", f"the member name {why}")
                continue
            special = _tar_special(info)
            if special is not None:
                yield Rejection(shown, "archive_link", f"the member {special}; only regular files are read")
                continue
            if info.isdir() or _skip_member(path):
                continue
            if info.size > limits.max_file_bytes:
                yield Rejection(
                    shown,
                    "file_too_large",
                    f"{info.size} bytes exceeds the per-file limit of {limits.max_file_bytes}",
                )
                continue
            extracted = tf.extractfile(info)
            if extracted is None:
                continue
            data = extracted.read(limits.max_file_bytes + 1)
            unpacked += len(data)
            if unpacked > limits.max_archive_bytes:
                raise _too_large(filename, limits, "it unpacks to")
            yield _member(filename, path, data, labelled)
