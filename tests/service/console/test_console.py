"""The console in Chromium, end to end on the real service: the key prompt, a dataset made and filled
(file picker, a dropped batch, a labelled evaluation archive), its thumbnails, a job submitted and
watched to the end with its plots and evaluation, and the model tried on an image beside zero-shot.
Every page is screenshotted (``SCREENSHOTS``); no script error and no Content-Security-Policy
violation may happen on the way."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.service.conftest import Service
from tests.service.helpers import TINY_SPEC, zip_of

pytest.importorskip("playwright")
from playwright.sync_api import Page, expect

KEY_ITEM = "lafter.apiKey"
# Stage 1 logs every 50 steps and stage 2 every 10: three points on each loss curve.
HP = {"text_steps": 150, "epochs": 10, "batch_size": 4, "max_steps": 30, "prompt_tokens": 4}


def picture(seed: int, red: bool, size: int = 96) -> bytes:
    """A distinct picture: a disc of the class's colour on a textured background."""
    rng = np.random.default_rng(seed)
    base = np.array((205, 60, 50) if red else (50, 90, 205), dtype=np.int16)
    arr = np.clip(base + rng.integers(-35, 35, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    fill = (255, 220, 200) if red else (200, 225, 255)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def as_file(name: str, data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"name": name, "mimeType": mime, "buffer": data}


class Watched:
    """A page with its script errors and CSP violations collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        # A refused key is a 401 the console handles; Chromium logs every failed fetch anyway.
        if msg.type == "error" and "status of 401" not in msg.text:
            self.errors.append(f"console: {msg.text}")


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    w = Watched(page)
    try:
        yield w
    finally:
        context.close()
    assert not w.errors, w.errors


def shot(page: Page, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def submit_key(page: Page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def drop_files(page: Page, selector: str, files: list[tuple[str, bytes]]) -> None:
    """A real drop event on the element, carrying File objects in its DataTransfer."""
    page.evaluate(
        """([selector, files]) => {
            const dt = new DataTransfer();
            for (const [name, b64] of files) {
                const bin = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bin], name, { type: "image/png" }));
            }
            const zone = document.querySelector(selector);
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        [selector, [[name, base64.b64encode(data).decode()] for name, data in files]],
    )


def points(page: Page, chart: str) -> int:
    return int(page.locator(f"{chart} svg").first.get_attribute("data-points") or 0)


def test_with_a_key_from_upload_to_a_classified_image(
    service: Service, watched: Watched, screenshots: Path
) -> None:
    page, api = watched.page, service.client
    page.goto(f"{service.url}/console")

    # No key yet: the prompt. A wrong key is refused and asked again; the right one is kept.
    overlay = page.locator("#key-overlay")
    expect(overlay).to_be_visible()
    shot(page, screenshots, "01-key-prompt")
    submit_key(page, "lft_not_a_key")
    expect(page.locator("#key-message")).to_contain_text("refused")
    expect(overlay).to_be_visible()
    submit_key(page, service.key)
    expect(overlay).to_be_hidden()
    expect(page.locator("#view h2")).to_have_text("Datasets")
    expect(page.locator("#session")).to_contain_text(service.key[:8])
    page.reload()
    expect(page.locator("#view h2")).to_have_text("Datasets")
    expect(overlay).to_be_hidden()
    assert page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") == service.key

    # A dataset, filled three ways.
    page.fill("#new-dataset-name", "console flow")
    page.click("#create-dataset button[type=submit]")
    expect(page.locator("#view h2")).to_have_text("console flow")
    ds_id = page.url.rsplit("/", 1)[1]
    assert api.get(f"/v1/datasets/{ds_id}").json()["name"] == "console flow"

    picked = [as_file(f"pick_{i}.png", picture(31000 + i, red=i % 2 == 0)) for i in range(10)]
    page.set_input_files("#upload-input", [*picked, as_file("notes.txt", b"not an image", "text/plain")])
    expect(page.locator("#accepted-count")).to_have_text("10 accepted")
    expect(page.locator("#rejected-count")).to_have_text("1 rejected")
    expect(page.locator("#rejected-files")).to_contain_text("notes.txt")
    expect(page.locator("#rejected-files")).to_contain_text("not_an_image")

    drop_files(page, "#dropzone", [(f"drop_{i}.png", picture(31100 + i, red=i == 0)) for i in range(2)])
    expect(page.locator("#accepted-count")).to_have_text("2 accepted")
    expect(page.locator("#rejected-count")).to_have_text("0 rejected")

    labelled = {f"{cls}/e{i}.png": picture(31200 + i + 10 * (cls == "red"), cls == "red")
                for cls in ("red", "blue") for i in range(2)}  # fmt: skip
    page.select_option("#upload-split", "eval")
    page.set_input_files("#upload-input", [as_file("eval.zip", zip_of(labelled), "application/zip")])
    expect(page.locator("#accepted-count")).to_have_text("4 accepted")

    ds = api.get(f"/v1/datasets/{ds_id}").json()
    assert (ds["image_count"], ds["eval_image_count"]) == (12, 4)
    expect(page.locator("#image-count")).to_have_text("12")
    expect(page.locator("#thumbs figure")).to_have_count(16)
    expect(page.locator("#thumbs figure[data-split=eval]")).to_have_count(4)
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#thumbs img')];"
        " return imgs.length === 16 && imgs.every((i) => i.complete && i.naturalWidth > 0); }"
    )
    shot(page, screenshots, "02-dataset")

    # A job, submitted from the form and watched until it ends.
    page.click("text=New job on this dataset")
    expect(page.locator("#job-dataset")).to_have_value(ds_id)
    page.fill("#job-classes", "red\nblue")
    page.fill("#job-base-model", TINY_SPEC)
    page.select_option("#job-descriptions", "templates")
    page.select_option("#job-recipe", "paper")
    page.fill("#job-seed", "7")
    page.fill("#job-hyperparameters", json.dumps(HP))
    shot(page, screenshots, "03-new-job")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[1]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["dataset_id"] == ds_id and job["class_names"] == ["red", "blue"]
    assert (job["seed"], job["recipe"], job["descriptions"]["source"]) == (7, "paper", "templates")
    assert job["hyperparameters"]["max_steps"] == 30 and job["hyperparameters"]["epochs"] == 10

    # The page follows the job on its own: its progress bar only goes forward, to 100%.
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = page.evaluate(
            "() => [document.querySelector('#job-status')?.textContent || '',"
            " Number(document.querySelector('#job-progress [role=progressbar]')?.getAttribute('aria-valuenow'))]"
        )
        if state[0] == "running" and all(s != "running" for s, _ in seen):
            shot(page, screenshots, "04-job-running")  # when the job is slow enough to be seen running
        seen.append((state[0], state[1]))
        if state[0] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert seen[-1][0] == "succeeded", (seen[-1], api.get(f"/v1/jobs/{job_id}").json())
    percents = [p for _, p in seen]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    expect(page.locator("#job-percent")).to_have_text("100%")
    expect(page.locator("#job-progress .stages li.done")).to_have_count(6)

    # The plots: the events the worker wrote, all of them.
    events = api.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    text_losses = [e for e in events if e["stage"] == "training_text_classifier" and "loss" in e["data"]]
    adapt_losses = [e for e in events if e["stage"] == "adapting" and "loss" in e["data"]]
    assert len(text_losses) == 3 and len(adapt_losses) == 3
    expect(page.locator("#chart-text-loss path.series")).to_have_count(1)
    assert points(page, "#chart-text-loss") == len(text_losses)
    assert points(page, "#chart-adapt-loss") == len(adapt_losses)
    d = page.locator("#chart-adapt-loss path.series").get_attribute("d") or ""
    assert d.count("L") == len(adapt_losses) - 1
    assert points(page, "#chart-pseudo-labels") == len(adapt_losses)
    expect(page.locator("#chart-pseudo-labels polygon.series")).to_have_count(2)

    # The evaluation: a labelled split, so accuracies of all three and the reason of the choice.
    job = api.get(f"/v1/jobs/{job_id}").json()
    model = api.get(f"/v1/models/{job['model_id']}").json()
    expect(page.locator("#chart-accuracy rect.bar")).to_have_count(3)
    expect(page.locator("#selection")).to_contain_text(model["evaluation"]["selection"]["reason"])
    expect(page.locator("#diagnostics tbody tr")).to_have_count(3)
    # Its confusion matrices, as the API has them: the served classifier's first, the others a click
    # away; rows are the true classes (two labelled images each), columns the predictions.
    labelled_ev = model["evaluation"]["labelled"]
    assert labelled_ev["images"] == len(labelled)
    confusion = labelled_ev["confusion"]
    assert set(confusion) == {"zero_shot", "text_classifier", "lafter"}
    for matrix in confusion.values():
        assert [sum(row) for row in matrix] == [2, 2]  # red, blue: the job's class order
    table = page.locator("#confusion")
    expect(table).to_have_attribute("data-kind", model["evaluation"]["selection"]["served"])
    for kind, matrix in confusion.items():
        page.click(f"#chart-confusion button[data-kind={kind}]")
        expect(table).to_have_attribute("data-kind", kind)
        expect(table.locator("thead th.cls")).to_have_text(["red", "blue"])
        expect(table.locator("tbody th.cls")).to_have_text(["red", "blue"])
        expect(table.locator("td.cell")).to_have_text([str(n) for row in matrix for n in row])
        expect(table.locator("td.diag")).to_have_text([str(matrix[i][i]) for i in range(2)])
        expect(table.locator("td.total")).to_have_text(["2", "2"])
        right = matrix[0][0] + matrix[1][1]
        expect(page.locator("#confusion-summary")).to_contain_text(f"{right} of 4 images on the diagonal")
        assert right / 4 == pytest.approx(labelled_ev["accuracy"][kind], abs=1e-4)
    page.click(f"#chart-confusion button[data-kind={model['evaluation']['selection']['served']}]")
    for warning in job["warnings"]:
        expect(page.locator("#job-warnings")).to_contain_text(warning["code"])
    expect(page.locator("#job-log")).to_contain_text("stage adapting started")
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, screenshots, "04-job")

    # The model: tried on an image beside zero-shot CLIP, and its snippets.
    page.click("#open-model")
    expect(page.locator("#view h2")).to_have_text(model["id"])
    query = picture(31300, red=True)
    page.set_input_files("#try-input", [as_file("query.png", query)])
    expect(page.locator("#adapted-result rect.bar")).to_have_count(2)
    expect(page.locator("#zero-shot-result rect.bar")).to_have_count(2)
    adapted = api.post(f"/v1/models/{model['id']}/classify", files=[("files", ("q.png", query))]).json()
    top = adapted["data"][0]["predictions"][0]
    expect(page.locator("#adapted-result .bar-label").first).to_have_text(top["label"])
    expect(page.locator("#adapted-result .bar-value").first).to_have_text(f"{100 * top['score']:.1f}%")
    zero = api.post(
        "/v1/classify",
        files=[("files", ("q.png", query))],
        data={"base_model": TINY_SPEC, "class_names": json.dumps(["red", "blue"])},
    ).json()
    expect(page.locator("#zero-shot-result .bar-label").first).to_have_text(
        zero["data"][0]["predictions"][0]["label"]
    )
    python = page.locator("#snippet-python").inner_text()
    assert "from lafter_client import Client" in python
    assert f'c.models.classify("{model["id"]}", ["img.jpg"], top_k=3)' in python
    assert service.key not in python  # a snippet never prints the key
    curl = page.locator("#snippet-curl").inner_text()
    assert f"/v1/models/{model['id']}/classify" in curl and "Authorization: Bearer $LAFTER_API_KEY" in curl
    shot(page, screenshots, "05-model")

    # The lists.
    page.goto(f"{service.url}/console/#/models")
    expect(page.locator(f"#models-table tr[data-id='{model['id']}']")).to_be_visible()
    shot(page, screenshots, "06-models")

    # A key that stops working mid-session: the prompt comes back, and the page loads after it.
    page.evaluate(f"sessionStorage.setItem('{KEY_ITEM}', 'lft_revoked')")
    page.goto(f"{service.url}/console/#/jobs")
    expect(overlay).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("refused")
    submit_key(page, service.key)
    row = page.locator(f"#jobs-table tr[data-id='{job_id}']")
    expect(row).to_contain_text("succeeded")
    shot(page, screenshots, "07-jobs")


def test_without_auth_there_is_no_key_prompt(auth_off_url: str, watched: Watched, screenshots: Path) -> None:
    page = watched.page
    page.goto(f"{auth_off_url}/console/")
    expect(page.locator("#view h2")).to_have_text("Datasets")
    expect(page.locator("#key-overlay")).to_be_hidden()
    expect(page.locator("#session")).to_have_text("no key needed")

    page.fill("#new-dataset-name", "single user")
    page.click("#create-dataset button[type=submit]")
    expect(page.locator("#view h2")).to_have_text("single user")
    page.set_input_files(
        "#upload-input", [as_file(f"s{i}.png", picture(32000 + i, i == 0)) for i in range(2)]
    )
    expect(page.locator("#accepted-count")).to_have_text("2 accepted")
    expect(page.locator("#thumbs img")).to_have_count(2)
    page.click("a[data-nav=datasets]")
    expect(page.locator("#datasets-table")).to_contain_text("single user")
    assert page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") is None
    expect(page.locator("#key-overlay")).to_be_hidden()
    shot(page, screenshots, "10-auth-off-datasets")
