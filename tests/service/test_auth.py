"""API keys and isolation: every /v1 operation needs a live key (401 problem JSON otherwise), keys
are made and revoked with ``python -m app keys``, are stored hashed, and one owner's datasets, jobs
and models are 404 to every other owner, in lists too. The embedded mode runs without keys and
says so."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from app.core.settings import Settings
from tests import launcher
from tests.service.conftest import MIN_IMAGES, OWNER, Service
from tests.service.helpers import (
    TINY_HP,
    TINY_SPEC,
    bearer,
    create_key,
    free_port,
    png,
    poll_job,
    two_class_images,
    upload,
    wait_http,
)

FINAL = {"succeeded", "failed", "cancelled"}
PUBLIC = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"]


def _v1_operations(service: Service) -> list[tuple[str, str]]:
    doc = httpx.get(f"{service.url}/openapi.json").json()
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if path.startswith("/v1/") and method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path.replace("{", "").replace("}", "")))
    return ops


def _assert_401(r: httpx.Response, code: str) -> None:
    assert r.status_code == 401, (r.request.method, r.request.url, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["code"] == code


def _cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return launcher.run("app", ["keys", *args], env=service.env)


def test_every_v1_operation_needs_a_live_key(service: Service) -> None:
    ops = _v1_operations(service)
    # Every resource the API has, so that a router added later without auth fails here.
    assert {p.split("/")[2] for _, p in ops} >= {"datasets", "jobs", "models", "classify", "base-models"}
    forged = "lft_0123456789abcdef_" + "A" * 43
    with service.client_for(None) as anonymous:
        for method, path in ops:
            _assert_401(anonymous.request(method, path), "auth_missing")
            _assert_401(anonymous.request(method, path, headers=bearer(forged)), "auth_invalid")
            _assert_401(
                anonymous.request(method, path, headers={"Authorization": "Basic dTpw"}), "auth_invalid"
            )
            # The key is checked before the body: a bad key never learns what a valid body looks like.
            r = anonymous.request(method, path, headers=bearer("not-a-key"), content=b"{", timeout=10)
            _assert_401(r, "auth_invalid")
        for path in PUBLIC:
            assert anonymous.get(path).status_code == 200, path
    # A real key with one character of its secret changed is refused like an unknown one.
    tampered = service.key[:-1] + ("A" if service.key[-1] != "A" else "B")
    _assert_401(service.client.get("/v1/datasets", headers=bearer(tampered)), "auth_invalid")
    assert service.client.get("/v1/datasets").status_code == 200


def test_keys_are_stored_hashed_and_revocation_is_immediate(service: Service) -> None:
    key = create_key(service.env, "revocable", name="ci laptop")
    _, key_id, secret = key.split("_", 2)
    with service.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM api_keys"))]
    stored = json.dumps(rows, default=str)
    assert secret not in stored and key not in stored  # neither the key nor its secret part
    row = next(r for r in rows if r["id"] == key_id)
    assert row["owner_id"] == "revocable" and row["name"] == "ci laptop"
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()

    listed = _cli(service, "list", "--owner", "revocable", "--json")
    assert listed.returncode == 0 and [json.loads(x)["id"] for x in listed.stdout.splitlines()] == [key_id]
    assert secret not in listed.stdout

    with service.client_for(key) as client:
        assert client.get("/v1/datasets").status_code == 200
        revoked = _cli(service, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        r = client.get("/v1/datasets")  # the same process, the very next request
        _assert_401(r, "auth_invalid")
        assert "revoked" in r.json()["detail"]
    assert _cli(service, "list", "--owner", "revocable", "--json").stdout.strip() == ""
    everything = _cli(service, "list", "--owner", "revocable", "--all", "--json").stdout.splitlines()
    assert json.loads(everything[0])["revoked_at"] is not None
    assert _cli(service, "revoke", "0000000000000000").returncode == 1
    bad_owner = _cli(service, "create", "--owner", "has space")
    assert bad_owner.returncode == 2 and bad_owner.stdout == ""


@pytest.fixture(scope="module")
def owned(service: Service) -> dict[str, Any]:
    """A dataset, a finished job and its model, all belonging to OWNER."""
    ds = service.client.post("/v1/datasets", json={"name": "mine"}).json()
    assert upload(service.client, ds["id"], two_class_images(MIN_IMAGES, offset=11000)).status_code == 200
    r = service.client.post(
        "/v1/jobs",
        json={
            "dataset_id": ds["id"],
            "class_names": ["red", "blue"],
            "base_model": TINY_SPEC,
            "descriptions": {"source": "templates"},
            "hyperparameters": TINY_HP,
        },
    )
    assert r.status_code == 202, r.text
    job = poll_job(service.client, r.json()["id"], FINAL)
    assert job["status"] == "succeeded", job
    return {"dataset": ds, "job": job, "model_id": job["model_id"]}


def test_another_owner_gets_404_for_everything_and_sees_none_of_it(
    service: Service, owned: dict[str, Any]
) -> None:
    ds_id, job_id, model_id = owned["dataset"]["id"], owned["job"]["id"], owned["model_id"]
    with service.engine.connect() as conn:
        for table, row_id in (("datasets", ds_id), ("jobs", job_id), ("models", model_id)):
            owner = conn.execute(sa.text(f"SELECT owner_id FROM {table} WHERE id = :i"), {"i": row_id})
            assert owner.scalar_one() == OWNER

    with service.client_for(create_key(service.env, "mallory")) as other:
        not_found = [
            other.get(f"/v1/datasets/{ds_id}"),
            upload(other, ds_id, [("sneaky.png", png(11500))]),
            other.delete(f"/v1/datasets/{ds_id}"),
            other.get(f"/v1/jobs/{job_id}"),
            other.get(f"/v1/jobs/{job_id}/events"),
            other.post(f"/v1/jobs/{job_id}/cancel"),
            other.get(f"/v1/models/{model_id}"),
            other.post(f"/v1/models/{model_id}/classify", files=[("files", ("q.png", png(11501)))]),
            other.delete(f"/v1/models/{model_id}"),
        ]
        for r in not_found:
            assert r.status_code == 404, (r.request.method, r.request.url, r.text)
            assert r.json()["code"].endswith("_not_found")
        # Lists hold only the caller's own rows.
        for path in ("/v1/datasets", "/v1/jobs", "/v1/models"):
            r = other.get(path, params={"limit": 100})
            assert r.status_code == 200 and r.json()["data"] == [], (path, r.text)
        # Another owner's dataset cannot be trained on either.
        r = other.post(
            "/v1/jobs",
            json={"dataset_id": ds_id, "class_names": ["a", "b"], "base_model": TINY_SPEC},
        )
        assert r.status_code == 422 and r.json()["code"] == "dataset_not_found", r.text
        # What mallory makes is hers alone.
        theirs = other.post("/v1/datasets", json={"name": "theirs"}).json()
        assert [d["id"] for d in other.get("/v1/datasets").json()["data"]] == [theirs["id"]]
    assert service.client.get(f"/v1/datasets/{theirs['id']}").status_code == 404
    assert theirs["id"] not in service.client.get("/v1/datasets", params={"limit": 100}).text

    # Nothing the other owner tried changed anything.
    mine = service.client.get(f"/v1/datasets/{ds_id}").json()
    assert mine["image_count"] == MIN_IMAGES
    assert service.client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    r = service.client.post(f"/v1/models/{model_id}/classify", files=[("files", ("q.png", png(11502)))])
    assert r.status_code == 200, r.text


def test_production_refuses_auth_off() -> None:
    prod = {
        "env": "production",
        "database_url": "postgresql+psycopg://u@db/x",
        "broker_url": "redis://redis:6379/0",
        "_env_file": None,
    }
    with pytest.raises(ValidationError, match="LAFTER_AUTH is off"):
        Settings(**prod, auth="off")  # type: ignore[arg-type]
    assert Settings(**prod).auth == "on"  # type: ignore[arg-type]
    assert Settings(**{**prod, "env": "test"}, auth="false").auth == "off"  # type: ignore[arg-type]


def test_embedded_mode_runs_without_keys_and_says_so_loudly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAFTER_")}
    env.update(LAFTER_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    log = tmp_path / "embedded.log"
    proc = launcher.launch(
        "app", ["--no-worker", "--port", str(port)], env=env, log=log, cwd=tmp_path, new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90, proc=proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/datasets", json={"name": "no key needed"})
        assert r.status_code == 201, r.text
        lines = log.read_text(errors="replace").splitlines()
        warning = [line for line in lines if "AUTH IS OFF" in line]
        assert warning and "WARNING" in warning[0] and "'default'" in warning[0], lines[-20:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
