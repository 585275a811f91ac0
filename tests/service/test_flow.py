"""Upload -> job -> poll -> succeeded -> classify, over HTTP, through the real worker process."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import sqlalchemy as sa

from tests.service.conftest import Service
from tests.service.helpers import TINY_HP, TINY_SPEC, png, poll_job, tar_of, two_class_images, upload, zip_of

CLASSES = ["red thing", "blue thing"]


@pytest.fixture(scope="module")
def trained(service: Service) -> dict[str, Any]:
    """One dataset with a labelled evaluation split and one finished job, shared by this module."""
    client = service.client
    ds = client.post("/v1/datasets", json={"name": "flow", "metadata": {"team": "qa"}})
    assert ds.status_code == 201, ds.text
    dataset = ds.json()
    assert dataset["status"] == "empty" and dataset["image_count"] == 0

    plain = two_class_images(6)
    archive = zip_of(
        {f"nested/extra_{i}.png": data for i, (_, data) in enumerate(two_class_images(6, offset=100))}
    )
    r = upload(client, dataset["id"], [*plain, ("more.zip", archive), ("again.png", plain[0][1])])
    assert r.status_code == 200, r.text
    report = r.json()
    assert len(report["accepted"]) == 12
    assert [d["filename"] for d in report["duplicates"]] == ["again.png"]
    assert report["rejected"] == []
    assert report["dataset"]["image_count"] == 12

    evaluation = tar_of(
        {
            **{f"eval/red thing/{i}.png": png(500 + i, (210, 40, 40)) for i in range(3)},
            **{f"eval/blue thing/{i}.png": png(600 + i, (40, 40, 210)) for i in range(3)},
        }
    )
    r = upload(client, dataset["id"], [("eval.tar.gz", evaluation)], split="eval")
    assert r.status_code == 200, r.text
    assert {a["label"] for a in r.json()["accepted"]} == set(CLASSES)
    assert r.json()["dataset"]["eval_image_count"] == 6
    assert r.json()["dataset"]["image_count"] == 12  # evaluation images never join the training split

    r = client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "class_names": CLASSES,
            "base_model": TINY_SPEC,
            "descriptions": {"source": "llm", "per_class": 2},
            "hyperparameters": {**TINY_HP, "pseudo_label_balance": "align"},
            "seed": 7,
            "metadata": {"run": "flow"},
        },
    )
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["status"] == "queued" and queued["seed"] == 7
    assert queued["hyperparameters"]["epochs"] == 1 and queued["hyperparameters"]["learning_rate"] == 5e-4
    job = poll_job(client, queued["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return {"dataset": dataset, "job": job}


def test_job_reports_progress_and_resolved_hyperparameters(service: Service, trained: dict[str, Any]) -> None:
    job = trained["job"]
    assert job["stage"] == "registering"
    assert job["progress"]["percent"] == 100.0
    assert job["progress"]["eta_seconds"] is None
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    hp = job["hyperparameters"]
    assert hp["text_steps"] == 5 and hp["epochs"] == 1 and hp["batch_size"] == 4
    assert hp["total_steps"] == 2 and hp["trainable_parameters"] > 0
    assert hp["pseudo_label_balance"] == "align"  # the option reaches stage 2 and is echoed back
    # No recipe asked: the default one, echoed with what it resolved (the request's values win).
    assert job["recipe"] == hp["recipe"] == "default"
    assert hp["prompt_tokens"] == 4 and hp["balance_prior_init"] == "pool"
    assert len(hp["strong_crop_scale"]) == len(hp["strong_blur_sigma"]) == 2
    assert job["metrics"]["descriptions"]["source_used"] == "llm"
    with service.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT heartbeat_at, started_at, attempts, worker_id FROM jobs WHERE id = :id"),
            {"id": job["id"]},
        ).one()
    assert row.heartbeat_at >= row.started_at and row.attempts == 1 and row.worker_id


def test_job_events_have_logs_and_metric_points(service: Service, trained: dict[str, Any]) -> None:
    job_id = trained["job"]["id"]
    page = service.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
    events = page["data"]
    stages = [e["stage"] for e in events if e["kind"] == "log" and (e["message"] or "").startswith("stage ")]
    assert {"encoding_text", "training_text_classifier", "evaluating", "registering"} <= set(stages)
    metric_points = [e for e in events if e["kind"] == "metric"]
    assert any("loss" in e["data"] and e["stage"] == "adapting" for e in metric_points)
    assert any("pseudo_label_histogram" in e["data"] for e in metric_points)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    # Cursor: asking after the second-to-last event gives exactly the last one.
    tail = service.client.get(f"/v1/jobs/{job_id}/events", params={"after": ids[-2]}).json()
    assert [e["id"] for e in tail["data"]] == [ids[-1]]
    assert tail["has_more"] is False and tail["next_cursor"] == str(ids[-1])


def test_model_is_registered_with_evaluation(service: Service, trained: dict[str, Any]) -> None:
    job = trained["job"]
    model = service.client.get(f"/v1/models/{job['model_id']}").json()
    assert model["job_id"] == job["id"] and model["class_names"] == CLASSES
    assert model["size_bytes"] > 0 and len(model["checksum"]) == 64
    evaluation = model["evaluation"]
    accuracy = evaluation["labelled"]["accuracy"]
    assert set(accuracy) == {"zero_shot", "text_classifier", "lafter"}
    assert evaluation["labelled"]["images"] == 6
    # The served model is the most accurate of the three, and says why.
    assert model["kind"] == evaluation["selection"]["served"]
    assert accuracy[model["kind"]] == max(accuracy.values())
    assert evaluation["selection"]["reason"]
    for kind in ("zero_shot", "text_classifier", "lafter"):
        diag = evaluation["diagnostics"][kind]
        assert sum(diag["pseudo_label_histogram"].values()) == 12
        assert 0.0 < diag["mean_confidence"] <= 1.0
    assert 0.0 <= evaluation["diagnostics"]["lafter"]["agreement_with_zero_shot"] <= 1.0
    if model["kind"] != "lafter":
        assert any(w["code"] == "adaptation_worse" for w in job["warnings"])


def test_classify_multipart_batch_with_top_k(service: Service, trained: dict[str, Any]) -> None:
    model_id = trained["job"]["model_id"]
    files = [("files", ("a.png", png(900))), ("files", ("b.png", png(901, (40, 40, 210))))]
    r = service.client.post(f"/v1/models/{model_id}/classify", files=files, data={"top_k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == model_id and body["top_k"] == 2  # capped at the class count
    assert [d["filename"] for d in body["data"]] == ["a.png", "b.png"]
    for item in body["data"]:
        scores = [p["score"] for p in item["predictions"]]
        assert scores == sorted(scores, reverse=True)
        assert {p["label"] for p in item["predictions"]} == set(CLASSES)
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)


def test_classify_json_base64_and_top_1(service: Service, trained: dict[str, Any]) -> None:
    model_id = trained["job"]["model_id"]
    image = base64.b64encode(png(902)).decode()
    r = service.client.post(f"/v1/models/{model_id}/classify", json={"images": [image], "top_k": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["predictions"]) == 1


def test_classify_rejects_a_broken_image(service: Service, trained: dict[str, Any]) -> None:
    model_id = trained["job"]["model_id"]
    r = service.client.post(f"/v1/models/{model_id}/classify", files=[("files", ("x.png", png(1)[:60]))])
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "image_corrupt"


def test_zero_shot_classify(service: Service) -> None:
    r = service.client.post(
        "/v1/classify",
        json={"base_model": TINY_SPEC, "class_names": ["cat", "dog", "bird"], "images": [
            base64.b64encode(png(903)).decode()
        ], "top_k": 2},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "zero_shot" and body["model_id"] is None
    assert len(body["data"][0]["predictions"]) == 2
    r = service.client.post(
        "/v1/classify",
        files=[("files", ("z.png", png(904)))],
        data={"base_model": TINY_SPEC, "class_names": '["cat", "dog"]'},
    )
    assert r.status_code == 200, r.text
    assert {p["label"] for p in r.json()["data"][0]["predictions"]} == {"cat", "dog"}


def test_lists_are_cursor_paginated(service: Service, trained: dict[str, Any]) -> None:
    client = service.client
    for i in range(2):
        assert client.post("/v1/datasets", json={"name": f"page-{i}"}).status_code == 201
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True
    second = client.get("/v1/datasets", params={"limit": 2, "after": first["next_cursor"]}).json()
    seen = {d["id"] for d in first["data"]}
    assert second["data"] and not seen & {d["id"] for d in second["data"]}
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    assert trained["job"]["id"] in {
        j["id"] for j in client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]
    }
