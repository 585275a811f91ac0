"""The two private standard-library hooks ``app.datasets.archives`` relies on, pinned: a Python
upgrade that changes either fails here, by name, rather than weakening the upload defences quietly.

- ``zipfile._EndRecData`` and the ``_ECD_*`` indices of the record it returns: the member limit is
  checked by walking the central directory it locates, before ``ZipFile`` reads it;
- ``tarfile.TarInfo._proc_member``: called for every member in stream mode, with the subclass given
  as ``tarinfo=``; oversized metadata headers and sparse members are refused there."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from app.datasets import archives
from app.datasets.images import Limits
from tests.service.helpers import png, tar_of, zip_of


def _limits(members: int) -> Limits:
    return Limits(max_file_bytes=100_000, max_image_pixels=100_000, min_image_side=8,
                  max_archive_members=members, max_archive_bytes=10_000_000)  # fmt: skip


def test_zipfile_end_record_parser_locates_the_central_directory() -> None:
    data = zip_of({f"{i}.png": png(i) for i in range(3)})
    endrec = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]
    # The indices _count_zip_directory reads (signature 0, directory size 5, its end 9).
    assert (zipfile._ECD_SIGNATURE, zipfile._ECD_SIZE, zipfile._ECD_LOCATION) == (0, 5, 9)  # type: ignore[attr-defined]
    assert endrec[0] == b"PK\x05\x06"
    assert endrec[zipfile._ECD_ENTRIES_TOTAL] == 3  # type: ignore[attr-defined]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert endrec[9] - endrec[5] == zf.start_dir  # where ZipFile itself reads the directory


def test_the_member_count_walks_the_directory_the_end_record_names() -> None:
    data = zip_of({f"{i}.png": png(i) for i in range(3)})
    stream = io.BytesIO(data)
    archives._count_zip_directory("ok.zip", stream, _limits(3))
    assert stream.tell() == 0  # left where ZipFile starts
    with pytest.raises(archives._ArchiveStop) as refused:
        archives._count_zip_directory("big.zip", io.BytesIO(data), _limits(2))
    assert refused.value.rejection.code == "archive_too_many_members"


def test_tarfile_calls_the_tarinfo_hook_for_every_member_in_stream_mode() -> None:
    data = tar_of({"a.png": png(1), "b/c.png": png(2)}, mode="w")
    seen: list[str] = []

    class Probe(tarfile.TarInfo):
        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            seen.append(self.name)
            return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", tarinfo=Probe) as tf:  # type: ignore[call-overload]
        names = [member.name for member in tf]
    assert seen == names == ["a.png", "b/c.png"]
    assert "_proc_member" in vars(archives._SafeTarInfo)  # the hook the upload reader overrides


def test_the_tar_hook_refuses_an_oversized_metadata_header() -> None:
    long_name = "d/" * 40_000 + "x.png"  # an 80 KB pax path header, over MAX_TAR_HEADER_BYTES
    data = tar_of({"ok.png": png(1), long_name: png(2)}, mode="w")
    with (
        pytest.raises(archives._TarRefused, match="metadata header"),
        tarfile.open(fileobj=io.BytesIO(data), mode="r|", tarinfo=archives._SafeTarInfo) as tf,  # type: ignore[call-overload]
    ):
        for _member in tf:
            pass
