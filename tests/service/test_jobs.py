"""Job lifecycle through the real worker: caches, cancellation, failures, idempotency, deletion."""

from __future__ import annotations

from typing import Any

import pytest

from tests.service.conftest import MIN_IMAGES, Service
from tests.service.factories import FINAL, create_dataset, run_job, submit_job
from tests.service.helpers import LONG_HP, TINY_HP, TINY_SPEC, poll_job, two_class_images, wait_for


@pytest.fixture(scope="module")
def dataset(service: Service) -> dict[str, Any]:
    return {"id": create_dataset(service.client, "jobs", MIN_IMAGES, offset=7000)}


def submit(service: Service, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return submit_job(service.client, dataset_id, **overrides)


def test_second_job_with_same_classes_hits_both_caches(service: Service, dataset: dict[str, Any]) -> None:
    local = [m for m in service.client.get("/v1/base-models").json()["data"] if m["source"] == "local"]
    spec = local[0]["spec"]  # the deployment's local checkpoint: no code change needed to use it
    names = ["granny smith apple", "conference pear", "quince"]
    first = poll_job(
        service.client,
        submit(
            service,
            dataset["id"],
            base_model=spec,
            class_names=names,
            descriptions={"source": "llm", "per_class": 2},
        )["id"],
        FINAL,
    )
    assert first["status"] == "succeeded", first
    cache = first["metrics"]["cache"]
    assert cache["descriptions"]["misses"] > 0 and cache["embeddings"]["misses"] > 0
    llm_calls = service.llm.count()

    second = poll_job(
        service.client,
        submit(
            service,
            dataset["id"],
            base_model=spec,
            class_names=names,
            descriptions={"source": "llm", "per_class": 2},
        )["id"],
        FINAL,
    )
    assert second["status"] == "succeeded", second
    cache = second["metrics"]["cache"]
    assert cache["descriptions"]["misses"] == 0 and cache["descriptions"]["hits"] > 0
    assert cache["embeddings"]["misses"] == 0 and cache["embeddings"]["hits"] > 0
    assert service.llm.count() == llm_calls  # the language model was not asked again
    assert second["metrics"]["descriptions"]["sentences"] == first["metrics"]["descriptions"]["sentences"]


def test_cancel_queued_and_running_jobs(service: Service, dataset: dict[str, Any]) -> None:
    running = submit(service, dataset["id"], hyperparameters=LONG_HP)
    queued = submit(service, dataset["id"])

    # The worker takes one job at a time, so the second waits in the queue: cancelling it is immediate.
    def training() -> bool:
        job = service.client.get(f"/v1/jobs/{running['id']}").json()
        return bool(job["stage"] == "adapting" and job["progress"]["step"] > 0)

    wait_for(training, 60, what="the long job to be training")
    r = service.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"]

    r = service.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("cancelling", "cancelled")
    done = poll_job(service.client, running["id"], FINAL, timeout=60)
    assert done["status"] == "cancelled" and done["model_id"] is None
    assert done["stage"] == "adapting" and done["progress"]["step"] > 0
    messages = [e["message"] for e in service.client.get(f"/v1/jobs/{running['id']}/events").json()["data"]]
    assert "cancel requested" in messages

    # The queued job's message is consumed later and skipped: it never starts.
    later = service.client.get(f"/v1/jobs/{queued['id']}").json()
    assert later["status"] == "cancelled" and later["started_at"] is None
    r = service.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "job_finished"


def test_a_failing_stage_fails_the_job_with_an_actionable_error(
    service: Service, dataset: dict[str, Any]
) -> None:
    broken = service.root / "models" / "broken" / "broken.pt"  # base models live in the model folders
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(b"this is not a checkpoint")
    config = TINY_SPEC.split("::")[0]
    job = poll_job(
        service.client, submit(service, dataset["id"], base_model=f"{config}::{broken}")["id"], FINAL
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "weights_unavailable"
    assert str(broken) in job["error"]["message"]
    assert job["model_id"] is None


def test_idempotency_key(service: Service, dataset: dict[str, Any]) -> None:
    body = {
        "dataset_id": dataset["id"],
        "class_names": ["x", "y"],
        "base_model": TINY_SPEC,
        "hyperparameters": TINY_HP,
    }
    headers = {"Idempotency-Key": "abc-123"}
    first = service.client.post("/v1/jobs", json=body, headers=headers)
    again = service.client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = service.client.post("/v1/jobs", json={**body, "class_names": ["x", "z"]}, headers=headers)
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    poll_job(service.client, first.json()["id"], FINAL)


def test_delete_model_and_dataset(service: Service) -> None:
    ds = {"id": create_dataset(service.client, "to-delete", MIN_IMAGES, offset=8000)}
    job = run_job(service.client, ds["id"])
    assert job["status"] == "succeeded", job
    model_id = job["model_id"]
    image = two_class_images(1, offset=8100)[0]
    # classified once, so this process holds the model's row and delta when it is deleted
    assert service.client.post(f"/v1/models/{model_id}/classify", files=[("files", image)]).status_code == 200
    assert service.client.delete(f"/v1/models/{model_id}").status_code == 204
    assert service.client.get(f"/v1/models/{model_id}").status_code == 404
    r = service.client.post(f"/v1/models/{model_id}/classify", files=[("files", ("a.png", b"x"))])
    assert r.status_code == 404

    blobs = service.blob_count()
    assert service.client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert service.client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert service.blob_count() == blobs - MIN_IMAGES  # its images were not shared with another dataset
    assert service.client.get(f"/v1/jobs/{job['id']}").json()["dataset_id"] is None


def test_base_models_listing(service: Service) -> None:
    data = service.client.get("/v1/base-models").json()["data"]
    specs = {m["spec"] for m in data}
    assert "ViT-B-32::openai" in specs
    local = [m for m in data if m["source"] == "local"]
    assert [m["arch"] for m in local] == ["tiny-local"]
    only_local = service.client.get("/v1/base-models", params={"source": "local"}).json()["data"]
    assert only_local == local


def test_health_ready_and_metrics(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    text = service.client.get("/metrics").text
    assert 'lafter_jobs{status="succeeded"}' in text
    assert "lafter_http_requests_total" in text
    assert service.client.get("/openapi.json").json()["info"]["title"]
