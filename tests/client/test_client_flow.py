"""The client against the real service (API, Postgres, Redis and a Celery worker: the ``stack``
fixture), end to end with the tiny model: a folder uploaded in chunks, a job followed over its event
stream, classification; then the same through the ``lafter-client`` command line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import lafter_client
from lafter_client import Client
from lafter_client.cli import main as cli_main
from tests.service.helpers import REPO, TINY_HP, TINY_SPEC, png, two_class_images

if TYPE_CHECKING:
    from tests.service.fixtures_worker import Stack

pytest_plugins = ["tests.service.fixtures_worker"]

CLASSES = ["red", "blue"]


@pytest.fixture(scope="module")
def api(stack: Stack) -> dict[str, str]:
    """The stack's URL and an API key of an owner of this module's own."""
    stack.ensure_worker()
    tenant = stack.tenant("client-sdk")
    key = str(tenant.client.headers["authorization"]).split(" ", 1)[1]
    return {"url": stack.url, "key": key}


def photo_folder(root: Path, n: int = 12) -> Path:
    """Images in nested folders, plus what a real photo folder holds besides images."""
    folder = root / "photos"
    for i, (name, data) in enumerate(two_class_images(n, offset=9100)):
        path = folder / ("day1" if i % 3 else "day2/raw") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "notes.txt").write_text("not an image: never sent")
    (folder / ".hidden.png").write_bytes(png(1))
    (folder / "day1" / "broken.png").write_bytes(png(9999)[:200])  # truncated: the service refuses it
    return folder


def test_adapt_through_the_client(
    api: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = Client(base_url=api["url"], api_key=api["key"])
    ds = client.datasets.create("client flow", metadata={"by": "test"})
    assert ds.metadata == {"by": "test"} and ds.image_count == 0
    assert ds.id in [d.id for d in client.datasets.list()]

    folder = photo_folder(tmp_path)
    report = client.datasets.upload(ds.id, folder, chunk_files=5)
    # 13 files walked (12 images + the broken one), 5 per request: 3 requests.
    assert report.requests == 3
    assert sorted(a.filename for a in report.accepted) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("img_*.png")
    )
    assert [(r.filename, r.code) for r in report.rejected] == [("day1/broken.png", "image_corrupt")]
    assert report.dataset is not None and report.dataset.image_count == 12
    progress = capsys.readouterr().err
    assert "13/13 files" in progress and "100.0%" in progress

    # A second upload of the same folder stores nothing twice, and says so per file.
    again = client.datasets.upload(ds.id, folder, progress=False)
    assert len(again.duplicates) == 12 and not again.accepted and again.requests == 1
    assert capsys.readouterr().err == ""

    # A labelled evaluation split: each image's class is its folder's name.
    evaluation = tmp_path / "eval"
    for i, color, label in ((0, (210, 40, 40), "red"), (1, (40, 40, 210), "blue")):
        (evaluation / label).mkdir(parents=True)
        (evaluation / label / f"e{i}.png").write_bytes(png(9500 + i, color))
    labelled = client.datasets.upload(ds.id, evaluation, split="eval", progress=False)
    assert sorted((a.filename, a.label) for a in labelled.accepted) == [
        ("blue/e1.png", "blue"),
        ("red/e0.png", "red"),
    ]
    assert client.datasets.get(ds.id).eval_image_count == 2

    job = client.jobs.create(
        ds.id,
        CLASSES,
        base_model=TINY_SPEC,
        descriptions={"source": "templates"},
        hyperparameters=TINY_HP,
        seed=3,
    )
    assert job.status == "queued" and job.seed == 3
    events: list[lafter_client.JobEvent] = []
    final = client.jobs.wait(job.id, on_event=events.append, timeout=300)
    assert final.status == "succeeded", final.error
    assert final.model_id and final.progress.percent == 100.0
    assert [e.id for e in events] == list(range(1, len(events) + 1))  # every event, once, in order
    points = [e for e in events if e.kind == "metric" and e.stage == "adapting"]
    assert points and {"loss", "images_per_s", "pseudo_label_histogram", "percent"} <= set(points[-1].data)
    # The same events over the stream (which raises StreamError if the service sent none), resumed.
    assert [e.id for e in client.jobs.events(job.id)] == [e.id for e in events]
    assert [e.id for e in client.jobs.events(job.id, after=3)] == [e.id for e in events[3:]]
    assert final.id in [j.id for j in client.jobs.list()]
    assert [e.id for e in client.jobs.list_events(job.id)][: len(events)] == [e.id for e in events]

    model = client.models.get(final.model_id)
    assert model.class_names == CLASSES and model.job_id == job.id
    assert final.model_id in [m.id for m in client.models.list()]
    images = sorted(folder.rglob("img_*.png"))[:3]
    result = client.models.classify(final.model_id, images, top_k=2)
    assert [r.index for r in result.data] == [0, 1, 2]
    assert [r.filename for r in result.data] == [p.name for p in images]
    for r in result.data:
        assert len(r.predictions) == 2 and {p.label for p in r.predictions} == set(CLASSES)
        assert r.top.score >= r.predictions[1].score
    zero_shot = client.classify_zero_shot(TINY_SPEC, CLASSES, [images[0].read_bytes()], top_k=1)
    assert zero_shot.kind == "zero_shot" and len(zero_shot.data[0].predictions) == 1

    # The service's errors, typed, with its codes.
    with pytest.raises(lafter_client.ConflictError) as conflict:
        client.jobs.cancel(final.id)
    assert conflict.value.code == "job_finished" and conflict.value.status == 409
    with pytest.raises(lafter_client.NotFoundError) as missing:
        client.jobs.get("job_doesnotexist")
    assert missing.value.code == "job_not_found"
    with pytest.raises(lafter_client.ValidationError) as invalid:
        client.jobs.create(ds.id, ["red", "Red"], base_model=TINY_SPEC)
    assert invalid.value.code == "class_names_duplicate" and invalid.value.field == "class_names.1"
    stranger = Client(base_url=api["url"], api_key="lft_nope_nope")
    with stranger, pytest.raises(lafter_client.AuthenticationError) as unauthorised:
        next(stranger.datasets.list())
    assert unauthorised.value.code == "auth_invalid"
    client.close()


def test_command_line_adapts_and_classifies(api: dict[str, str], tmp_path: Path) -> None:
    folder = photo_folder(tmp_path, n=10)
    base = ["--base-url", api["url"], "--api-key", api["key"], "--quiet"]
    hp = [f"--hp={k}={json.dumps(v)}" for k, v in TINY_HP.items()]
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main([*base, "adapt", str(folder), "--classes", ",".join(CLASSES), "--base-model", TINY_SPEC,
                         "--descriptions", "templates", *hp, "--wait", "--timeout", "300"])  # fmt: skip
    job = json.loads(out.getvalue())
    assert code == 0 and job["status"] == "succeeded" and job["model_id"], job
    assert job["hyperparameters"]["max_steps"] == TINY_HP["max_steps"]

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main([*base, "classify", job["model_id"], str(next(folder.rglob("img_*.png")))]) == 0
    assert {p["label"] for p in json.loads(out.getvalue())["data"][0]["predictions"]} == set(CLASSES)

    # The installed entry point, configured from the environment like the SDK.
    env = {**os.environ, "LAFTER_BASE_URL": api["url"], "LAFTER_API_KEY": api["key"]}
    done = subprocess.run([sys.executable, "-m", "lafter_client", "jobs", "get", job["id"]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == job["id"]
    missing = subprocess.run([sys.executable, "-m", "lafter_client", "jobs", "get", "job_nope"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 1 and "404 job_not_found" in missing.stderr
