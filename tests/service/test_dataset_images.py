"""A dataset's images, listed (cursor pages) and as thumbnails made on the fly: what the web console
shows, through the public API like everything else."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.service.conftest import Service
from tests.service.helpers import create_key, png, upload


def _photo(width: int, height: int) -> bytes:
    """A smooth JPEG (small on disk, large in pixels): the thumbnail must shrink it."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _transparent_png() -> bytes:
    arr = np.zeros((48, 64, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[:, 32:, 3] = 255  # left half fully transparent
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_listed_in_cursor_pages_with_their_metadata(service: Service) -> None:
    c = service.client
    ds = c.post("/v1/datasets", json={"name": "listing"}).json()
    files = [(f"p{i}.png", png(21000 + i)) for i in range(5)] + [("photo.jpg", _photo(640, 480))]
    report = upload(c, ds["id"], files).json()
    assert len(report["accepted"]) == 6
    ev = upload(c, ds["id"], [("e.png", png(21100))], split="eval", labels='{"e.png": "red"}').json()
    assert len(ev["accepted"]) == 1

    seen: list[dict] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["after"] = cursor
        r = c.get(f"/v1/datasets/{ds['id']}/images", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= 3
        seen += page["data"]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages == 3
    assert len({img["id"] for img in seen}) == 7
    by_name = {img["filename"]: img for img in seen}
    photo = by_name["photo.jpg"]
    assert (photo["width"], photo["height"], photo["format"]) == (640, 480, "JPEG")
    assert photo["bytes"] == len(files[-1][1]) and photo["split"] == "train" and photo["label"] is None
    assert by_name["e.png"]["split"] == "eval" and by_name["e.png"]["label"] == "red"
    accepted_ids = {a["image_id"] for a in report["accepted"] + ev["accepted"]}
    assert accepted_ids == {img["id"] for img in seen}

    only_eval = c.get(f"/v1/datasets/{ds['id']}/images", params={"split": "eval"}).json()
    assert [img["filename"] for img in only_eval["data"]] == ["e.png"]
    assert c.get(f"/v1/datasets/{ds['id']}/images", params={"split": "test"}).status_code == 422


def test_thumbnails_are_small_jpegs_with_cache_headers(service: Service) -> None:
    c = service.client
    ds = c.post("/v1/datasets", json={"name": "thumbs"}).json()
    report = upload(c, ds["id"], [("photo.jpg", _photo(1200, 900)), ("alpha.png", _transparent_png())]).json()
    ids = {a["filename"]: a["image_id"] for a in report["accepted"]}

    url = f"/v1/datasets/{ds['id']}/images/{ids['photo.jpg']}/thumbnail"
    r = c.get(url, params={"size": 128})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and thumb.size == (128, 96)
    # The same picture, smaller: the gradient runs left to right in red.
    px = np.asarray(thumb.convert("RGB"), dtype=np.int16)
    assert px[48, 5, 0] < 40 and px[48, 122, 0] > 215

    # The default size, and a conditional request answered without a body.
    r = c.get(url)
    assert Image.open(io.BytesIO(r.content)).size == (256, 192)
    again = c.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == r.headers["etag"]
    assert c.get(url, params={"size": 64}, headers={"If-None-Match": r.headers["etag"]}).status_code == 200

    # Never enlarged; transparency laid on white.
    r = c.get(f"/v1/datasets/{ds['id']}/images/{ids['alpha.png']}/thumbnail", params={"size": 512})
    small = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert small.size == (64, 48)
    assert min(small.getpixel((5, 20))) > 240  # transparent half: white
    assert small.getpixel((50, 20))[0] > 180 and small.getpixel((50, 20))[1] < 60  # opaque half: red

    for bad in (8, 513, "big"):
        r = c.get(url, params={"size": bad})
        assert r.status_code == 422 and r.json()["code"], r.text


def test_images_and_thumbnails_are_the_owners_only(service: Service) -> None:
    c = service.client
    ds = c.post("/v1/datasets", json={"name": "mine"}).json()
    other_ds = c.post("/v1/datasets", json={"name": "also mine"}).json()
    image_id = upload(c, ds["id"], [("a.png", png(21200))]).json()["accepted"][0]["image_id"]
    thumb = f"/v1/datasets/{ds['id']}/images/{image_id}/thumbnail"

    with service.client_for(create_key(service.env, "eve")) as eve:
        for r in (eve.get(f"/v1/datasets/{ds['id']}/images"), eve.get(thumb)):
            assert r.status_code == 404 and r.json()["code"] == "dataset_not_found", r.text
    with service.client_for(None) as anonymous:
        assert anonymous.get(thumb).status_code == 401
    # The image under another dataset of the same owner, an unknown image, an unknown dataset.
    r = c.get(f"/v1/datasets/{other_ds['id']}/images/{image_id}/thumbnail")
    assert r.status_code == 404 and r.json()["code"] == "image_not_found"
    r = c.get(f"/v1/datasets/{ds['id']}/images/img_nope/thumbnail")
    assert r.status_code == 404 and r.json()["code"] == "image_not_found"
    r = c.get("/v1/datasets/ds_nope/images")
    assert r.status_code == 404 and r.json()["code"] == "dataset_not_found"
