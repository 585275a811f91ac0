"""Hostile uploads: each is refused with its own code, the rest of the upload is kept, nothing is
written outside the storage root, and the API process's memory stays bounded.

Real HTTP against a real API process: a second uvicorn process on the session's database, with
its own storage root, its own temp folder (where the multipart parser spools uploads) and limits
small enough to hit cheaply. Its peak RSS is read from ``/proc/<pid>/status`` (VmHWM).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageFile

from app.datasets.archives import iter_archive
from app.datasets.images import Candidate, Limits, Rejection
from tests.service.helpers import REPO, free_port, png, start_api, wait_http

MiB = 1024 * 1024
MAX_FILE_BYTES = 4 * MiB
MAX_IMAGE_PIXELS = 4_000_000
MAX_ARCHIVE_MEMBERS = 100
MAX_ARCHIVE_BYTES = 80 * MiB
MAX_REQUEST_BYTES = 72 * MiB
MAX_FILES_PER_REQUEST = 40
MAX_UNPACKED_FILES = 150


@dataclass
class Api:
    url: str
    client: httpx.Client
    pid: int
    root: Path
    storage: Path
    spool: Path
    log: Path

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the API process, in bytes."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def peak_growth(self, action: Callable[[], Any]) -> tuple[Any, int]:
        """Run ``action``; return its result and how far the API's peak RSS rose above its RSS
        before. The peak is reset first where the kernel allows (clear_refs 5); otherwise it is
        the lifetime peak, and the memory tests run first in this module."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        before, _ = self.rss()
        result = action()
        _, peak = self.rss()
        return result, peak - before


@pytest.fixture(scope="module")
def api(
    request: pytest.FixtureRequest,
    pg_database: str,
    redis_broker: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("hostile")
    storage, spool, log = root / "blobs", root / "spool", root / "api.log"
    spool.mkdir()
    env = {
        **os.environ,
        "LAFTER_ENV": "test",
        "LAFTER_DATABASE_URL": pg_database,
        "LAFTER_BROKER_URL": redis_broker,
        "LAFTER_DATA_DIR": str(root),
        "LAFTER_STORAGE_DIR": str(storage),
        # Auth is not what this module tests; the session's service covers it.
        "LAFTER_AUTH": "off",
        "LAFTER_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "LAFTER_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "LAFTER_MAX_ARCHIVE_MEMBERS": str(MAX_ARCHIVE_MEMBERS),
        "LAFTER_MAX_ARCHIVE_BYTES": str(MAX_ARCHIVE_BYTES),
        "LAFTER_MAX_ARCHIVE_RATIO": "100",
        "LAFTER_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "LAFTER_MAX_FILES_PER_REQUEST": str(MAX_FILES_PER_REQUEST),
        "LAFTER_MAX_UNPACKED_FILES": str(MAX_UNPACKED_FILES),
        "LAFTER_API_DEVICE": "cpu",
        "LAFTER_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(spool),  # where the multipart parser spools uploads
    }
    port = free_port()
    proc = start_api(env, log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        # The session's service makes the schema (alembic) while this process starts up.
        request.getfixturevalue("service")
        wait_http(f"{url}/healthz", timeout=90, proc=proc)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield Api(url, client, proc.pid, root, storage, spool, log)
    except BaseException:
        print("---- hostile api log ----\n" + log.read_text(errors="replace")[-5000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def new_dataset(api: Api, name: str) -> str:
    r = api.client.post("/v1/datasets", json={"name": name})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def post(api: Api, dataset: str, files: list[tuple[str, bytes]], **data: str) -> httpx.Response:
    return api.client.post(
        f"/v1/datasets/{dataset}/images",
        files=[("files", (name, content)) for name, content in files],
        data=data,
    )


def report(r: httpx.Response) -> tuple[list[str], dict[str, str]]:
    """200: (accepted file names, {rejected file name: code})."""
    assert r.status_code == 200, r.text
    body = r.json()
    return [a["filename"] for a in body["accepted"]], {x["filename"]: x["code"] for x in body["rejected"]}


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


# --- building hostile files ---------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, rows: int = 1) -> bytes:
    """A PNG whose header declares width x height RGB pixels; ``rows`` rows of real zero pixels."""
    row = b"\0" * (1 + 3 * width)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x4c\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


def jpeg_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(seed))).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def bmp(seed: int, width: int = 600, height: int = 580) -> bytes:
    """An incompressible ~1 MB image."""
    buf = io.BytesIO()
    pixels = (seed.to_bytes(4, "big") + os.urandom(3 * width * height))[: 3 * width * height]
    Image.frombytes("RGB", (width, height), pixels).save(buf, format="BMP")
    return buf.getvalue()


def zip_bytes(
    entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def zip_link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: external_attr carries the mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tf.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tf.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


# --- memory: these run first, on a fresh process --------------------------------------------------


def test_large_archive_streams_with_bounded_memory(api: Api) -> None:
    """60 MB of images in one zip: stored one batch at a time, never all in memory."""
    ds = new_dataset(api, "big-archive")
    warm = post(api, ds, [("warm.png", png(9000))])  # first-request imports count in the baseline
    assert warm.status_code == 200, warm.text
    images = [(f"photos/{i:03d}.bmp", bmp(i)) for i in range(60)]
    archive = zip_bytes(list(images), method=zipfile.ZIP_STORED)
    assert len(archive) > 60 * 1000 * 1000

    r, growth = api.peak_growth(lambda: post(api, ds, [("photos.zip", archive)]))
    accepted, rejected = report(r)
    assert rejected == {}
    assert len(accepted) == 60
    # Holding the archive's images at once would take 60+ MB; streaming holds about one batch.
    assert growth < 40 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"
    assert api.client.delete(f"/v1/datasets/{ds}").status_code == 204  # frees 60 MB of blobs


def test_pixel_bomb_is_refused_from_its_header(api: Api) -> None:
    """A real, fully decodable 8000x8000 PNG (256 MB of pixels once decoded) in 190 KB, plus
    headers claiming 100000x100000 (PNG) and 65535x65535 (GIF, JPEG): refused from the header,
    before any pixel buffer exists."""
    ds = new_dataset(api, "pixel-bombs")
    real_bomb = png_claiming(8000, 8000, rows=8000)
    assert len(real_bomb) < MAX_FILE_BYTES
    files = [
        ("ok.png", png(9100)),
        ("real-bomb.png", real_bomb),
        ("claims.png", png_claiming(100_000, 100_000)),
        ("claims.gif", gif_claiming(65535, 65535)),
        ("claims.jpg", jpeg_claiming(65535, 65535)),
        ("just-over.jpg", jpeg_claiming(2001, 2000)),  # 4,002,000 pixels: our limit, not Pillow's
    ]
    r, growth = api.peak_growth(lambda: post(api, ds, files))
    accepted, rejected = report(r)
    assert accepted == ["ok.png"]
    assert rejected == {name: "image_too_many_pixels" for name, _ in files[1:]}
    assert growth < 40 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB: pixels were decoded"


def test_enormous_bodies_are_answered_with_bounded_memory(api: Api) -> None:
    ds = new_dataset(api, "enormous")
    boundary = "hostile-boundary"
    total = MAX_REQUEST_BYTES + 8 * MiB

    def chunked_body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="huge.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        block = b"\0" * MiB
        for _ in range(total // MiB):
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    # No Content-Length (chunked): the limit trips mid-stream; the rest is drained, not kept.
    r, growth = api.peak_growth(
        lambda: api.client.post(
            f"/v1/datasets/{ds}/images",
            content=chunked_body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    )
    problem(r, 413, "request_too_large")
    assert growth < 30 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"

    # A declared 1 TB body with "Expect: 100-continue" (curl's way): answered before a byte is
    # sent. Reading the body would answer "100 Continue" and wait for a terabyte.
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        auth = api.client.headers.get("authorization")
        head = (
            f"POST /v1/datasets/{ds}/images HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {10**12}\r\nExpect: 100-continue\r\n"
            + (f"Authorization: {auth}\r\n" if auth else "")
            + "\r\n"
        )
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(65536):  # "Connection: close": read to the end
            answer += chunk
    head_part, _, body_part = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in head_part.lower()
    assert b'"code":"request_too_large"' in body_part.replace(b" ", b"")


# --- images ---------------------------------------------------------------------------------------


def test_truncated_and_disguised_images(api: Api) -> None:
    ds = new_dataset(api, "disguised")
    good_jpeg = jpeg(9200)
    good_png = png(9201)
    files = [
        ("ok.jpg", good_jpeg),
        ("cut.jpg", good_jpeg[: len(good_jpeg) // 2]),  # pixels missing: load() fails
        ("no-end.png", good_png[:-12]),  # every pixel there, IEND missing: verify() fails
        ("bad-crc.png", good_png[:60] + bytes([good_png[60] ^ 0xFF]) + good_png[61:]),  # in IDAT
        ("notes.jpg", b"just some text\n" * 50),
        ("paper.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 20),
        ("page.png", b"<!doctype html><script>alert(1)</script>" * 20),
        ("photos.jpg", zip_bytes([("a.png", png(9202)), ("b.png", png(9203))])),  # a zip, renamed
        ("tool.gif", b"\x7fELF\x02\x01\x01" + b"\0" * 500),
    ]
    accepted, rejected = report(post(api, ds, files))
    assert accepted == ["ok.jpg"]
    assert rejected == {
        "cut.jpg": "image_corrupt",
        "no-end.png": "image_corrupt",
        "bad-crc.png": "image_corrupt",
        "notes.jpg": "not_an_image",
        "paper.jpg": "not_an_image",
        "page.png": "not_an_image",
        "photos.jpg": "not_an_image",
        "tool.gif": "not_an_image",
    }


def test_truncated_images_are_never_loaded_leniently() -> None:
    """Pillow's LOAD_TRUNCATED_IMAGES pads a cut image with grey: nothing may turn it on."""
    import re

    import app.main  # noqa: F401  (everything the API imports)
    import worker.pipeline  # noqa: F401  (what the worker runs; not its Celery app, which makes folders)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    enables = re.compile(r"LOAD_TRUNCATED_IMAGES\s*=\s*(True|1)")
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("app", "lafter", "worker")
        for path in (REPO / folder).rglob("*.py")
        if enables.search(path.read_text())
    ]
    assert offenders == []


# --- archives -------------------------------------------------------------------------------------


def test_unsafe_members_write_nothing_outside_storage(api: Api) -> None:
    """Traversal names, absolute names, links and devices: each refused per member, the good
    members kept, and nothing written anywhere but content-addressed blobs in the storage root."""
    sentinel = api.root / "evil.txt"
    payload = png(9300)  # a valid image: refused for its name or kind, not its content
    evil_zip = zip_bytes(
        [
            ("ok/one.png", png(9301)),
            ("../../../evil.txt", payload),
            (str(sentinel), payload),
            ("..\\..\\evil.png", payload),
            ("C:/evil.png", payload),
            zip_link("link.png", str(sentinel)),
            zip_link("up", "../../.."),
        ]
    )
    evil_tar = tar_bytes(
        [
            ("ok/two.png", png(9302)),
            ("../evil.png", payload),
            (str(sentinel), payload),
            tar_special("sym.png", tarfile.SYMTYPE, str(sentinel)),
            tar_special("hard.png", tarfile.LNKTYPE, "/etc/passwd"),
            tar_special("tty.png", tarfile.CHRTYPE),
            tar_special("disk.png", tarfile.BLKTYPE),
            tar_special("pipe.png", tarfile.FIFOTYPE),
            tar_special("dir-link", tarfile.SYMTYPE, str(api.root)),
            ("dir-link/evil.txt", b"written through a link?"),  # only ever a name: not an image
        ]
    )
    ds = new_dataset(api, "unsafe-members")
    accepted, rejected = report(
        post(api, ds, [("top.png", png(9303)), ("evil.zip", evil_zip), ("evil.tgz", evil_tar)])
    )
    assert accepted == ["top.png", "evil.zip/ok/one.png", "evil.tgz/ok/two.png"]
    assert rejected == {
        "evil.zip/../../../evil.txt": "archive_unsafe_path",
        f"evil.zip/{sentinel}": "archive_unsafe_path",
        "evil.zip/..\\..\\evil.png": "archive_unsafe_path",
        "evil.zip/C:/evil.png": "archive_unsafe_path",
        "evil.zip/link.png": "archive_link",
        "evil.zip/up": "archive_link",
        "evil.tgz/../evil.png": "archive_unsafe_path",
        f"evil.tgz/{sentinel}": "archive_unsafe_path",
        "evil.tgz/sym.png": "archive_link",
        "evil.tgz/hard.png": "archive_link",
        "evil.tgz/tty.png": "archive_link",
        "evil.tgz/disk.png": "archive_link",
        "evil.tgz/pipe.png": "archive_link",
        "evil.tgz/dir-link": "archive_link",
        "evil.tgz/dir-link/evil.txt": "not_an_image",
    }
    # An evaluation split takes its class from the folder: a '..' folder is refused, not a label.
    eval_tar = tar_bytes([("cat/three.png", png(9304)), ("../dog/four.png", png(9305))])
    accepted, rejected = report(post(api, ds, [("eval.tgz", eval_tar)], split="eval"))
    assert accepted == ["eval.tgz/cat/three.png"]
    assert rejected == {"eval.tgz/../dog/four.png": "archive_unsafe_path"}

    assert not sentinel.exists() and not (api.root.parent / "evil.txt").exists()
    assert_only_blobs_written(api)


def assert_only_blobs_written(api: Api) -> None:
    """Under the API's root: the log, an empty spool folder, and blobs named by their SHA-256."""
    import hashlib

    for path in api.root.rglob("*"):
        if path.is_dir() or path == api.log:
            continue
        rel = path.relative_to(api.storage).parts if path.is_relative_to(api.storage) else None
        assert rel is not None and len(rel) == 3 and rel[0] == "images", f"unexpected file {path}"
        assert rel[2] == hashlib.sha256(path.read_bytes()).hexdigest() and rel[1] == rel[2][:2], path
    left = [p for p in api.spool.iterdir() if p.is_file()]
    assert left == [], "spooled uploads were left behind"


def test_nested_archives_are_not_unpacked(api: Api) -> None:
    inner_zip = zip_bytes([("deep.png", png(9400))])
    inner_tar = tar_bytes([("deeper.png", png(9401))])
    outer = zip_bytes(
        [
            ("ok.png", png(9402)),
            ("inner.zip", inner_zip),
            ("inner.tar.gz", inner_tar),
            ("sneaky.png", inner_zip),  # an archive named like an image
            ("data.gz", gzip.compress(png(9403))),
            ("plain.tar", tar_bytes([("x.png", png(9404))], mode="w")),
        ]
    )
    ds = new_dataset(api, "nested")
    accepted, rejected = report(post(api, ds, [("outer.zip", outer)]))
    assert accepted == ["outer.zip/ok.png"]
    assert rejected == {
        f"outer.zip/{name}": "archive_nested"
        for name in ("inner.zip", "inner.tar.gz", "sneaky.png", "data.gz", "plain.tar")
    }


def test_zip_bombs(api: Api) -> None:
    """Per member: a high compression ratio, a declared size over the file limit, a member whose
    real size exceeds its declared one; per archive: declared sizes over the archive limit."""
    zeros = b"\0" * (3 * MiB)  # under the 4 MB file limit, but 1000:1
    liar = zip_bytes([("liar.png", bytes(range(1, 201)) * 1000)], method=zipfile.ZIP_STORED)
    liar = liar.replace(struct.pack("<I", 200_000), struct.pack("<I", 1000))  # declared 1000 bytes
    bombs = zip_bytes(
        [
            ("ok.png", png(9500)),
            ("flat.bmp", zeros),
            ("huge.png", b"\0" * (MAX_FILE_BYTES + 1)),
        ]
    )
    too_big = zip_bytes([(f"part{i}.bin", b"\0" * (MAX_FILE_BYTES - 1)) for i in range(25)])
    assert len(bombs) < 100_000 and len(too_big) < 300_000
    ds = new_dataset(api, "zip-bombs")
    accepted, rejected = report(
        post(api, ds, [("bombs.zip", bombs), ("liar.zip", liar), ("too-big.zip", too_big)])
    )
    assert accepted == ["bombs.zip/ok.png"]
    assert rejected == {
        "bombs.zip/flat.bmp": "archive_bomb",
        "bombs.zip/huge.png": "file_too_large",
        "liar.zip/liar.png": "archive_corrupt",
        "too-big.zip": "archive_too_large",
    }
    # Nothing accepted at all: the whole request is refused, 413 since every reason is a size.
    r = post(api, ds, [("too-big.zip", too_big)])
    assert problem(r, 413, "archive_too_large")["rejected"][0]["filename"] == "too-big.zip"


def test_gzip_stream_bomb_stops_early(api: Api) -> None:
    """A tar.gz whose gzip stream inflates to 1 GB from 1 MB: the decompressed bytes are counted and
    the archive stops at the ratio limit, after keeping the member before the bomb."""
    good = png(9600)
    head = io.BytesIO()
    with tarfile.open(fileobj=head, mode="w") as tf:
        info = tarfile.TarInfo("ok.png")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
    tar_start = head.getvalue()[: 512 + (len(good) + 511) // 512 * 512]  # no end-of-archive blocks
    header = tarfile.TarInfo("zeros.bin")
    header.size = 1024 * MiB
    zeros_16mb = gzip.compress(b"\0" * (16 * MiB), compresslevel=9)
    bomb = gzip.compress(tar_start + header.tobuf(format=tarfile.GNU_FORMAT)) + zeros_16mb * 64
    assert len(bomb) < 2 * MiB
    ds = new_dataset(api, "gzip-bomb")
    started = time.monotonic()
    accepted, rejected = report(post(api, ds, [("bomb.tar.gz", bomb), ("after.png", png(9601))]))
    elapsed = time.monotonic() - started
    assert accepted == ["bomb.tar.gz/ok.png", "after.png"]
    assert rejected == {"bomb.tar.gz/zeros.bin": "file_too_large", "bomb.tar.gz": "archive_bomb"}
    assert elapsed < 10, f"took {elapsed:.1f}s: the bomb was inflated"


def test_too_many_members(api: Api) -> None:
    """Zip: counted from its central directory (even when the end record lies about the count),
    refused before any member is read. Tar: a stream, counted as it goes; the rest refused."""
    many = [(f"m{i:03d}.png", png(9700 + i, size=8)) for i in range(MAX_ARCHIVE_MEMBERS + 1)]
    many_zip = zip_bytes(list(many), method=zipfile.ZIP_STORED)
    end = many_zip.rfind(b"PK\x05\x06")
    lying_zip = many_zip[: end + 8] + struct.pack("<HH", 1, 1) + many_zip[end + 12 :]
    many_tar = tar_bytes([(f"t{i:03d}.txt", b"x") for i in range(MAX_ARCHIVE_MEMBERS + 5)])
    ds = new_dataset(api, "many-members")
    accepted, rejected = report(
        post(api, ds, [("ok.png", png(9699)), ("many.zip", many_zip), ("lying.zip", lying_zip)])
    )
    assert accepted == ["ok.png"]
    assert rejected == {"many.zip": "archive_too_many_members", "lying.zip": "archive_too_many_members"}

    r = post(api, ds, [("many.tgz", many_tar)])
    body = problem(r, 422, "no_images_accepted")
    codes = [x["code"] for x in body["rejected"]]
    assert codes == ["not_an_image"] * MAX_ARCHIVE_MEMBERS + ["archive_too_many_members"]


def test_too_many_files(api: Api) -> None:
    ds = new_dataset(api, "too-many-files")
    # More multipart files than LAFTER_MAX_FILES_PER_REQUEST: the whole request is refused.
    r = post(api, ds, [(f"f{i}.png", png(9800 + i, size=8)) for i in range(MAX_FILES_PER_REQUEST + 1)])
    problem(r, 413, "too_many_files")
    # Archives unpacking to more than LAFTER_MAX_UNPACKED_FILES in all: processing stops there.
    junk = [zip_bytes([(f"{a}/{i:02d}.txt", b"x") for i in range(90)]) for a in ("a", "b")]
    r = post(api, ds, [("ok.png", png(9850)), ("a.zip", junk[0]), ("b.zip", junk[1])])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["filename"] for a in body["accepted"]] == ["ok.png"]
    codes = [x["code"] for x in body["rejected"]]
    assert codes == ["not_an_image"] * (MAX_UNPACKED_FILES - 1) + ["too_many_files"]
    assert body["rejected"][-1]["filename"] == "b.zip"


def test_everything_written_so_far_is_a_blob(api: Api) -> None:
    assert_only_blobs_written(api)


# --- the archive reader itself, for what is slow or awkward over HTTP ----------------------------

SMALL = Limits(
    max_file_bytes=100_000,
    max_image_pixels=1_000_000,
    min_image_side=8,
    max_archive_members=10,
    max_archive_bytes=2 * MiB,
    max_archive_ratio=100,
)


def read_archive(name: str, data: bytes, kind: str = "tar") -> list[Candidate | Rejection]:
    return list(iter_archive(name, io.BytesIO(data), kind, SMALL, labelled=False))


def codes_of(items: list[Candidate | Rejection]) -> list[str]:
    return [i.code if isinstance(i, Rejection) else "candidate" for i in items]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_total_is_counted_on_the_unpacked_stream(mode: str) -> None:
    """A member over the file limit is skipped, but skipping still unpacks it: counted too."""
    members = [("small.txt", b"x"), ("big.bin", os.urandom(2 * MiB + 1000)), ("after.txt", b"y")]
    items = read_archive("big.tar", tar_bytes(list(members), mode=mode))
    assert codes_of(items) == ["candidate", "file_too_large", "archive_too_large"]


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_bz2_and_xz_bombs(mode: str) -> None:
    items = read_archive("bomb", tar_bytes([("a.bin", b"x"), ("zeros.bin", b"\0" * (2 * MiB))], mode=mode))
    assert codes_of(items) == ["candidate", "file_too_large", "archive_bomb"]


def test_oversized_tar_metadata_and_sparse_members_are_refused() -> None:
    long_name = "d/" * 40_000 + "x.png"  # an 80 KB pax path header
    pax = tar_bytes([("ok.png", png(1)), (long_name, png(2))], mode="w")
    assert codes_of(read_archive("pax.tar", pax)) == ["candidate", "archive_corrupt"]

    sparse = bytearray(tar_bytes([("ok.png", png(1)), ("s.png", png(2))], mode="w"))
    second = 512 + (len(png(1)) + 511) // 512 * 512
    sparse[second + 156] = ord("S")  # GNU sparse type
    checksum = sum(sparse[second : second + 148]) + 8 * 32 + sum(sparse[second + 156 : second + 512])
    sparse[second + 148 : second + 156] = b"%06o\0 " % checksum
    assert codes_of(read_archive("sparse.tar", bytes(sparse))) == ["candidate", "archive_corrupt"]
