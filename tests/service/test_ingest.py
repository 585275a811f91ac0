"""Upload validation without HTTP: decoding, archives, limits."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from app.datasets.archives import iter_archive, looks_like_archive
from app.datasets.images import Candidate, DecodedImage, Limits, Rejection, decode_image
from tests.service.helpers import png, tar_of, zip_of

LIMITS = Limits(
    max_file_bytes=100_000,
    max_image_pixels=100_000,
    min_image_side=8,
    max_archive_members=5,
    max_archive_bytes=300_000,
)


def test_decodes_a_real_image() -> None:
    out = decode_image(Candidate("a.png", png(1), None), LIMITS)
    assert isinstance(out, DecodedImage) and out.format == "PNG" and (out.width, out.height) == (40, 40)
    assert len(out.sha256) == 64


def test_rejections_have_distinct_codes() -> None:
    def code(data: bytes) -> str:
        out = decode_image(Candidate("f", data, None), LIMITS)
        assert isinstance(out, Rejection)
        return out.code

    assert code(b"") == "empty_file"
    assert code(b"hello world") == "not_an_image"
    assert code(png(1)[:80]) == "image_corrupt"
    assert code(b"\0" * 100_001) == "file_too_large"
    big = io.BytesIO()
    Image.new("L", (400, 400)).save(big, format="PNG")
    assert code(big.getvalue()) == "image_too_many_pixels"
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, format="PNG")
    assert code(tiny.getvalue()) == "image_too_small"


def test_archive_detection() -> None:
    assert looks_like_archive("x.zip", b"") == "zip"
    assert looks_like_archive("x", zip_of({"a": b"1"})[:512]) == "zip"
    assert looks_like_archive("x", tar_of({"a": b"1"})[:512]) == "tar"
    assert looks_like_archive("x.png", png(1)[:512]) is None


def test_labelled_archive_takes_the_parent_folder_as_class() -> None:
    data = tar_of({"root/cat/1.png": png(1), "root/dog/2.png": png(2), ".hidden": b"x"})
    items = list(iter_archive("e.tgz", io.BytesIO(data), "tar", LIMITS, labelled=True))
    assert [(i.filename, i.label) for i in items if isinstance(i, Candidate)] == [
        ("e.tgz/root/cat/1.png", "cat"),
        ("e.tgz/root/dog/2.png", "dog"),
    ]


def test_archive_limits_and_links() -> None:
    many = zip_of({f"{i}.png": png(i) for i in range(7)})
    items = list(iter_archive("m.zip", io.BytesIO(many), "zip", LIMITS, labelled=False))
    assert isinstance(items[-1], Rejection) and items[-1].code == "archive_too_many_members"

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("evil")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    links = list(iter_archive("l.tar", io.BytesIO(buf.getvalue()), "tar", LIMITS, labelled=False))
    assert [r.code for r in links if isinstance(r, Rejection)] == ["archive_link"]
    assert not any(isinstance(i, Candidate) for i in links)

    broken = list(iter_archive("b.zip", io.BytesIO(b"PK\x03\x04garbage"), "zip", LIMITS, labelled=False))
    assert [r.code for r in broken if isinstance(r, Rejection)] == ["archive_corrupt"]
