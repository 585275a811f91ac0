"""What the service tells one owner about others, what its metrics say, and what a job says about a
deleted model.

- a job's event ids are its own sequence (1, 2, 3...): no gap counts another owner's events, and
  ``?after=`` is still the cursor;
- ``/metrics`` in production needs ``LAFTER_METRICS_TOKEN`` as a Bearer token, or is off (404);
  development and the embedded mode keep it open;
- request metrics are labelled by the route template (``/v1/jobs/{job_id}``), never "unknown";
- a job whose model was deleted names no model (``model_id`` null) and says so in its events.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from app.core.settings import Settings, get_settings
from tests.service.conftest import MIN_IMAGES, Service
from tests.service.helpers import (
    TINY_HP,
    TINY_SPEC,
    api_process,
    bearer,
    create_key,
    poll_job,
    two_class_images,
    upload,
)

FINAL = {"succeeded", "failed", "cancelled"}


def job_body(dataset: str, **overrides: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset,
        "class_names": ["cat", "dog"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        "hyperparameters": TINY_HP,
        **overrides,
    }


def dataset_of(client: httpx.Client, offset: int) -> str:
    ds = client.post("/v1/datasets", json={"name": "honesty"}).json()
    r = upload(client, ds["id"], two_class_images(MIN_IMAGES, offset=offset))
    assert r.status_code == 200, r.text
    return str(ds["id"])


def events(client: httpx.Client, job_id: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    page: dict[str, Any] = r.json()
    return page


# --- 9. event ids reveal nothing across owners ----------------------------------------------------


def test_event_ids_are_the_jobs_own_sequence(service: Service) -> None:
    mine = service.client
    other = service.client_for(create_key(service.env, "honesty-other"))
    ds_mine, ds_other = dataset_of(mine, 81000), dataset_of(other, 82000)
    # Interleaved: my job's event, three of the other owner's, my job's again.
    a = mine.post("/v1/jobs", json=job_body(ds_mine)).json()
    for _ in range(3):
        b = other.post("/v1/jobs", json=job_body(ds_other)).json()
        other.post(f"/v1/jobs/{b['id']}/cancel")
    mine.post(f"/v1/jobs/{a['id']}/cancel")
    poll_job(mine, a["id"], FINAL)
    ids = [e["id"] for e in events(mine, a["id"])["data"]]
    assert len(ids) >= 2
    assert ids == list(range(1, len(ids) + 1)), ids  # no gap counts the other owner's events
    # The cursor still works: after the first event, the rest; after the last, nothing new.
    tail = events(mine, a["id"], after=ids[0])
    assert [e["id"] for e in tail["data"]] == ids[1:]
    end = events(mine, a["id"], after=ids[-1])
    assert end["data"] == [] and end["next_cursor"] == str(ids[-1])
    other.close()


# --- 9. /metrics behind a setting in production ---------------------------------------------------


def production_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "production",
        "database_url": "postgresql+psycopg://u@127.0.0.1:5432/none",
        "broker_url": "redis://127.0.0.1:6379/15",
        "auth": "on",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def client_with(settings: Settings) -> TestClient:
    """The app with these settings, in this process (no lifespan: no reaper, no database)."""
    from app.main import create_app

    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def test_metrics_is_off_in_production_without_a_token(tmp_path: Path) -> None:
    client = client_with(production_settings(data_dir=tmp_path))
    r = client.get("/metrics")
    assert r.status_code == 404, r.text
    assert "lafter_jobs" not in r.text
    # Development (and the embedded mode) keep it open.
    dev = client_with(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    assert dev.get("/metrics").status_code == 200


def test_metrics_needs_the_token_in_production(service: Service, tmp_path: Path) -> None:
    token = "metrics-" + os.urandom(12).hex()
    env = {**service.env, "LAFTER_ENV": "production", "LAFTER_METRICS_TOKEN": token}
    with api_process(env, tmp_path / "api-prod.log") as url:
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
        assert httpx.get(f"{url}/metrics", headers=bearer("nope"), timeout=30).status_code == 401
        # An owner's API key is not the metrics token.
        assert httpx.get(f"{url}/metrics", headers=bearer(service.key), timeout=30).status_code == 401
        r = httpx.get(f"{url}/metrics", headers=bearer(token), timeout=30)
        assert r.status_code == 200 and "lafter_jobs" in r.text


# --- 10. metrics by route template ----------------------------------------------------------------


def test_metrics_label_routes_by_template(service: Service) -> None:
    client = service.client
    client.get("/v1/jobs/job_doesnotexist")
    client.get("/v1/datasets")
    service.client_for(None).get("/v1/models/model_nokey")  # refused before routing: still its template
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    routes = set(re.findall(r'lafter_http_requests_total\{[^}]*route="([^"]*)"', text))
    assert "unknown" not in routes, routes
    assert {"/v1/jobs/{job_id}", "/v1/datasets", "/v1/models/{model_id}"} <= routes, routes
    assert not any("doesnotexist" in r or "nokey" in r for r in routes), routes


# --- 13. a deleted model is not named by its job ---------------------------------------------------


def test_a_job_stops_naming_its_deleted_model(service: Service) -> None:
    client = service.client
    job = client.post("/v1/jobs", json=job_body(dataset_of(client, 83000))).json()
    job = poll_job(client, job["id"], FINAL, timeout=240)
    assert job["status"] == "succeeded", job
    model_id = job["model_id"]
    assert model_id and client.get(f"/v1/models/{model_id}").status_code == 200
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    after = client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded"
    assert after["model_id"] is None, after
    last = events(client, job["id"])["data"][-1]
    assert last["message"] == f"model {model_id} was deleted", last
