"""Same request, same model: two identical jobs on the same images and seed give bitwise identical
adapted tensors on the CPU, whatever order, and whichever dataset, the images were uploaded in."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa
import torch
from PIL import Image

from lafter.artifact import AdaptedModel
from lafter.pipeline import tensors_sha256
from tests.service.conftest import Service
from tests.service.helpers import TINY_SPEC, png, poll_job, two_class_images, upload

# Varies between runs of one request, by nature: wall-clock times and what the caches held.
UNSTABLE_METRICS = ("base_model_load_s", "cache", "seconds")


def _stable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if k not in UNSTABLE_METRICS}
    out["adapting"] = {k: v for k, v in out["adapting"].items() if k != "images_per_s"}
    return out


def _artifact(service: Service, model_id: str) -> AdaptedModel:
    with service.engine.connect() as conn:
        data = conn.execute(
            sa.text("SELECT data FROM model_artifacts WHERE model_id = :id"), {"id": model_id}
        ).scalar_one()
    return AdaptedModel.from_bytes(bytes(data))


def _twins() -> list[tuple[str, bytes]]:
    """Two images one pixel apart, labelled with the two classes: every classifier predicts one class
    for both, so all three score 50% on this evaluation split, and the tie serves the adapted model
    (whose tensors the artifacts then hold)."""
    pixels = np.array(Image.open(io.BytesIO(png(9400))))
    out = []
    for i in range(2):
        pixels[0, 0, 0] = i
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append((f"twin_{i}.png", buf.getvalue()))
    return out


def _upload_eval(client: httpx.Client, dataset_id: str, twins: list[tuple[str, bytes]]) -> None:
    labels = {"twin_0.png": "red thing", "twin_1.png": "blue thing"}
    r = upload(client, dataset_id, twins, split="eval", labels=json.dumps(labels))
    assert r.status_code == 200 and len(r.json()["accepted"]) == 2, r.text


def test_same_images_in_another_order_and_dataset_give_the_same_model(service: Service) -> None:
    client = service.client
    files = two_class_images(12, offset=9300)
    first = client.post("/v1/datasets", json={"name": "same-a"}).json()
    assert upload(client, first["id"], files).status_code == 200
    _upload_eval(client, first["id"], _twins())
    # The same bytes under other names, in another order, over several requests.
    renamed = [(f"copy_{i}.png", data) for i, (_, data) in enumerate(reversed(files))]
    second = client.post("/v1/datasets", json={"name": "same-b"}).json()
    _upload_eval(client, second["id"], _twins()[::-1])
    assert upload(client, second["id"], renamed[6:]).status_code == 200
    assert upload(client, second["id"], renamed[:6]).status_code == 200

    body = {
        "class_names": ["red thing", "blue thing"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        # several epochs of shuffled batches, all drawn by position in the training set
        "hyperparameters": {"text_steps": 5, "epochs": 3, "batch_size": 4},
        "seed": 1234,
    }
    submitted = []
    for ds in (first, second):
        r = client.post("/v1/jobs", json={**body, "dataset_id": ds["id"]})
        assert r.status_code == 202, r.text
        submitted.append(r.json()["id"])
    jobs = [poll_job(client, job_id, {"succeeded", "failed", "cancelled"}) for job_id in submitted]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    a, b = jobs
    assert a["hyperparameters"] == b["hyperparameters"]
    assert a["hyperparameters"]["total_steps"] == 9
    assert _stable(a["metrics"]) == _stable(b["metrics"])
    assert a["warnings"] == b["warnings"]

    assert a["metrics"]["adapting"]["steps"] == 9
    # The adapted tensors, whichever classifier the evaluation chose to serve: bitwise equal.
    digest = a["metrics"]["adapting"]["tensors_sha256"]
    assert len(digest) == 64 and digest == b["metrics"]["adapting"]["tensors_sha256"]

    models = [client.get(f"/v1/models/{j['model_id']}").json() for j in jobs]
    assert models[0]["evaluation"] == models[1]["evaluation"]
    assert models[0]["evaluation"]["labelled"]["accuracy"] == {
        "zero_shot": 0.5,
        "text_classifier": 0.5,
        "lafter": 0.5,
    }
    assert models[0]["kind"] == models[1]["kind"] == "lafter"
    left, right = (_artifact(service, j["model_id"]) for j in jobs)
    assert left.tensors.keys() == right.tensors.keys()
    for name, tensor in left.tensors.items():
        assert torch.equal(tensor, right.tensors[name]), name
    assert tensors_sha256(left.tensors) == digest
