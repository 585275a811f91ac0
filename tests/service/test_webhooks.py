"""Webhooks end to end: a job's final status reaches a receiver (a real HTTP server on 127.0.0.1)
from the worker process, signed per Standard Webhooks and retried; URLs and secrets are checked at
submit; the sender itself refuses private addresses and follows no redirect."""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.webhooks.tables import WebhookMessage
from tests.service.conftest import MIN_IMAGES, Service
from tests.service.helpers import (
    TINY_HP,
    TINY_SPEC,
    api_process,
    poll_job,
    two_class_images,
    upload,
    wait_for,
)
from tests.service.webhook_receiver import Receiver, signature_valid

FINAL = {"succeeded", "failed", "cancelled"}
Owners = Callable[..., tuple[httpx.Client, str]]


@pytest.fixture
def new_owner(service: Service) -> Iterator[Callable[..., tuple[httpx.Client, str]]]:
    """Makes fresh owners (each its own key) with a dataset ready for jobs: (client, dataset id)."""
    from app.keys import service as keys

    clients: list[httpx.Client] = []

    def make(name: str, *, dataset: bool = True) -> tuple[httpx.Client, str]:
        owner = f"{name}-{uuid.uuid4().hex[:6]}"
        with Session(service.engine) as session:
            key = keys.create(session, owner, name="pytest").key
            session.commit()
        client = service.client_for(key)
        clients.append(client)
        if not dataset:
            return client, ""
        ds = client.post("/v1/datasets", json={"name": owner}).json()
        images = two_class_images(MIN_IMAGES, offset=30000 + zlib.crc32(owner.encode()) % 5000)
        r = upload(client, ds["id"], images)
        assert r.status_code == 200, r.text
        return client, ds["id"]

    yield make
    for client in clients:
        client.close()


def job_body(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "class_names": ["cat", "dog"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        "hyperparameters": TINY_HP,
        **overrides,
    }


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


def make_secret(client: httpx.Client) -> str:
    r = client.post("/v1/webhook-secret")
    assert r.status_code == 201, r.text
    secret: str = r.json()["secret"]
    return secret


def wait_delivery(client: httpx.Client, job_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        deliveries = job["webhook_deliveries"]
        return job if deliveries and deliveries[0]["state"] == state else None

    found: dict[str, Any] = wait_for(settled, timeout, 0.2, f"job {job_id}'s webhook to be {state}")
    return found


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- the secret ------------------------------------------------------------------------------------


def test_the_secret_is_shown_once_and_only_to_its_owner(service: Service, new_owner: Owners) -> None:
    alice, _ = new_owner("wh-alice", dataset=False)
    bob, _ = new_owner("wh-bob", dataset=False)
    assert alice.get("/v1/webhook-secret").json() == {
        "object": "webhook_secret",
        "exists": False,
        "created_at": None,
    }
    r = alice.post("/v1/webhook-secret")
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    first = r.json()
    assert first["rotated"] is False
    assert first["secret"].startswith("whsec_")
    assert len(base64.b64decode(first["secret"][len("whsec_") :])) >= 24  # the scheme's minimum

    status = alice.get("/v1/webhook-secret")
    assert status.json()["exists"] is True and status.json()["created_at"] == first["created_at"]
    assert "secret" not in status.json() and first["secret"][6:] not in status.text

    # Another owner sees none of it, and making theirs changes nothing of alice's.
    assert bob.get("/v1/webhook-secret").json()["exists"] is False
    bobs = make_secret(bob)
    assert bobs != first["secret"]
    assert alice.get("/v1/webhook-secret").json()["created_at"] == first["created_at"]

    # POST again: a new secret (rotation), shown once again; the old one is gone.
    second = alice.post("/v1/webhook-secret").json()
    assert second["rotated"] is True and second["secret"] not in (first["secret"], bobs)
    with service.engine.connect() as conn:
        stored = {row[0] for row in conn.execute(sa.text("SELECT secret FROM webhook_secrets"))}
    assert second["secret"] in stored and first["secret"] not in stored


# --- submit-time rules -----------------------------------------------------------------------------


def test_webhook_url_rules_at_submit(service: Service, new_owner: Owners) -> None:
    client, dataset_id = new_owner("wh-rules")
    before = service.count("jobs")
    receiver_like = "http://127.0.0.1:9/hook"
    # No secret yet: refused, saying what to do.
    answer = problem(
        client.post("/v1/jobs", json=job_body(dataset_id, webhook_url=receiver_like)),
        422,
        "webhook_secret_missing",
    )
    assert answer["field"] == "webhook_url" and "POST /v1/webhook-secret" in answer["detail"]
    make_secret(client)
    for url in (
        "ftp://example.com/hook",
        "https://user:password@example.com/hook",
        "https://token@example.com/hook",
        "http:///no-host",
        "http://example.com:99999/",
        "http://example.com/" + "a" * 2000,
        "javascript:alert(1)",
        "https://bücher.example/hook",
    ):
        answer = problem(
            client.post("/v1/jobs", json=job_body(dataset_id, webhook_url=url)),
            422,
            "webhook_url_invalid",
        )
        assert answer["field"] == "webhook_url", url
    assert service.count("jobs") == before


def test_private_addresses_are_refused_unless_the_operator_allows_them(
    service: Service, new_owner: Owners
) -> None:
    client, dataset_id = new_owner("wh-private")
    make_secret(client)
    env = {**service.env, "LAFTER_WEBHOOK_ALLOW_PRIVATE": "false", "LAFTER_REAPER_INTERVAL_S": "0"}
    before = service.count("jobs")
    log = service.logs / "api-webhooks-private.log"
    with (
        api_process(env, log) as url,
        httpx.Client(base_url=url, headers=dict(client.headers), timeout=60) as strict,
    ):
        for hook in (
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://[::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/hook",
            "http://0.0.0.0/hook",
            "http://224.0.0.1/hook",
        ):
            r = strict.post("/v1/jobs", json=job_body(dataset_id, webhook_url=hook))
            answer = problem(r, 422, "webhook_url_forbidden")
            assert answer["field"] == "webhook_url" and "LAFTER_WEBHOOK_ALLOW_PRIVATE" in answer["detail"]
    assert service.count("jobs") == before
    # This deployment allows them (LAFTER_WEBHOOK_ALLOW_PRIVATE=true): the same URL is accepted.
    r = client.post("/v1/jobs", json=job_body(dataset_id, webhook_url="http://127.0.0.1:8080/hook"))
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == "http://127.0.0.1:8080/hook" and r.json()["webhook_deliveries"] == []
    client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    poll_job(client, r.json()["id"], FINAL)


# --- deliveries ------------------------------------------------------------------------------------


def test_a_receiver_that_fails_twice_gets_the_signed_message_on_the_third_attempt(
    service: Service, new_owner: Owners
) -> None:
    client, dataset_id = new_owner("wh-retry")
    with Receiver(["500", "reset"]) as receiver:
        secret = make_secret(client)
        queued = client.post("/v1/jobs", json=job_body(dataset_id, webhook_url=receiver.url))
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]
        assert queued.json()["webhook_url"] == receiver.url
        job = poll_job(client, job_id, FINAL)
        assert job["status"] == "succeeded", job  # the receiver's failures never touch the job
        job = wait_delivery(client, job_id, "delivered")

    [delivery] = job["webhook_deliveries"]
    assert delivery["type"] == "job.succeeded" and delivery["next_attempt_at"] is None
    first, second, third = delivery["attempts"]
    assert first["status_code"] == 500 and first["error"] == "HTTP 500"
    assert second["status_code"] is None and second["error"]  # reset: no answer at all
    assert third["status_code"] == 204 and third["error"] is None
    assert all(a["duration_ms"] >= 0 for a in delivery["attempts"])
    # The job was final before the first attempt, and the attempts waited for the backoff (0.3 s).
    assert ts(job["finished_at"]) <= ts(first["at"]) < ts(second["at"]) < ts(third["at"])
    assert ts(second["at"]) - ts(first["at"]) >= 0.3

    calls = receiver.calls
    assert len(calls) == 3
    assert {c.headers["webhook-id"] for c in calls} == {delivery["id"]}  # one message, three attempts
    assert len({c.body for c in calls}) == 1
    for call in calls:
        assert call.path == "/hooks/lafter"
        assert call.headers["content-type"] == "application/json"
        assert signature_valid(secret, call.headers, call.body)
        assert abs(int(call.headers["webhook-timestamp"]) - call.at) < 60
    # The signature binds the body, the id and the timestamp: change any and it fails.
    call = calls[-1]
    assert not signature_valid(secret, call.headers, call.body.replace(b"succeeded", b"failed"))
    assert not signature_valid(secret, {**call.headers, "webhook-id": "msg_other"}, call.body)
    assert not signature_valid(secret, {**call.headers, "webhook-timestamp": "1"}, call.body)
    assert not signature_valid(make_secret(client), call.headers, call.body)  # a rotated secret

    body = json.loads(call.body)
    assert body["type"] == "job.succeeded" and ts(body["timestamp"]) == ts(job["finished_at"])
    data = body["data"]
    assert data["id"] == job_id and data["status"] == "succeeded" and data["error"] is None
    assert data["model_id"] == job["model_id"] is not None


def test_a_failed_job_delivers_job_failed(service: Service, new_owner: Owners) -> None:
    client, dataset_id = new_owner("wh-failed")
    broken = service.root / "models" / "wh-broken" / "broken.pt"  # base models live in the model folders
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(b"this is not a checkpoint")
    with Receiver() as receiver:
        secret = make_secret(client)
        config = TINY_SPEC.split("::")[0]
        body = job_body(dataset_id, base_model=f"{config}::{broken}", webhook_url=receiver.url)
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job = poll_job(client, r.json()["id"], FINAL)
        assert job["status"] == "failed" and job["error"]["code"] == "weights_unavailable"
        job = wait_delivery(client, job["id"], "delivered")
    [delivery] = job["webhook_deliveries"]
    assert delivery["type"] == "job.failed" and len(delivery["attempts"]) == 1
    [call] = receiver.calls
    assert signature_valid(secret, call.headers, call.body)
    sent = json.loads(call.body)
    assert sent["type"] == "job.failed" and sent["data"]["status"] == "failed"
    assert sent["data"]["error"] == job["error"] and sent["data"]["model_id"] is None


def test_a_queued_job_cancelled_by_the_api_delivers_job_cancelled_from_the_worker(
    service: Service, new_owner: Owners
) -> None:
    """The cancel of a queued job is the API's own write; its message is still sent by the worker.
    The job is submitted through a second API whose queue no worker reads, so it stays queued."""
    client, dataset_id = new_owner("wh-cancel")
    env = {
        **service.env,
        "LAFTER_GPU_QUEUE": f"nobody-{uuid.uuid4().hex[:6]}",
        "LAFTER_REAPER_INTERVAL_S": "0",
    }
    with Receiver() as receiver, api_process(env, service.logs / "api-webhooks-cancel.log") as url:
        secret = make_secret(client)
        with httpx.Client(base_url=url, headers=dict(client.headers), timeout=60) as idle:
            r = idle.post("/v1/jobs", json=job_body(dataset_id, webhook_url=receiver.url))
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            cancelled = idle.post(f"/v1/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
            # Written by the API in the cancel's transaction; sent by the worker's sender.
            assert [d["state"] for d in cancelled.json()["webhook_deliveries"]] == ["pending"]
        job = wait_delivery(client, job_id, "delivered")
    assert job["started_at"] is None  # no worker ever ran it
    [call] = receiver.calls
    assert signature_valid(secret, call.headers, call.body)
    sent = json.loads(call.body)
    assert sent["type"] == "job.cancelled" and sent["data"]["id"] == job_id
    assert sent["data"]["status"] == "cancelled"


def test_a_job_without_webhook_url_sends_nothing(service: Service, new_owner: Owners) -> None:
    client, dataset_id = new_owner("wh-none")
    make_secret(client)
    r = client.post("/v1/jobs", json=job_body(dataset_id))
    job = poll_job(client, r.json()["id"], FINAL)
    assert job["webhook_url"] is None and job["webhook_deliveries"] == []
    with service.engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT count(*) FROM webhook_messages WHERE job_id = :j"), {"j": job["id"]}
        )
        assert count.scalar_one() == 0


# --- the sender on its own (in this process, real sockets) -----------------------------------------


@pytest.fixture
def sender_settings(tmp_path: Any) -> Iterator[Settings]:
    yield Settings(_env_file=None, data_dir=tmp_path, webhook_timeout_s=1.0)  # type: ignore[call-arg]


def _message(url: str) -> WebhookMessage:
    return WebhookMessage(id="msg_test", job_id="job_test", owner_id="o", url=url, event_type="job.succeeded",
                          body='{"type":"job.succeeded"}', attempt_count=0, attempts=[])  # fmt: skip


SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_the_sender_checks_the_address_again_at_delivery(sender_settings: Settings) -> None:
    """A URL accepted at submit whose name now resolves to a private address (DNS rebinding) is not
    sent to: the check is made on the address the sender connects to."""
    from worker.webhooks import send

    with Receiver() as receiver:
        for url in (receiver.url, f"http://localhost:{receiver.port}/hook"):
            attempt = send(_message(url), SECRET, sender_settings)
            assert attempt["status_code"] is None and attempt["error"].startswith("refused"), attempt
        assert receiver.calls == []
        allowed = sender_settings.model_copy(update={"webhook_allow_private": True})
        attempt = send(_message(receiver.url), SECRET, allowed)
        assert attempt["status_code"] == 204 and attempt["error"] is None
        assert len(receiver.calls) == 1 and signature_valid(
            SECRET, receiver.calls[0].headers, receiver.calls[0].body
        )


def test_the_sender_follows_no_redirect_and_gives_up_on_a_silent_receiver(sender_settings: Settings) -> None:
    from worker.webhooks import send

    settings = sender_settings.model_copy(update={"webhook_allow_private": True})
    with Receiver(["302", "hang"]) as receiver:
        attempt = send(_message(receiver.url), SECRET, settings)
        assert attempt["status_code"] == 302 and "redirect" in attempt["error"]
        assert [c.path for c in receiver.calls] == ["/hooks/lafter"]  # /elsewhere never asked
        start = time.monotonic()
        attempt = send(_message(receiver.url), SECRET, settings)
        assert attempt["status_code"] is None and attempt["error"].startswith("timeout"), attempt
        assert time.monotonic() - start < 5  # the 1 s timeout, not the receiver's 30 s


def test_a_job_the_reaper_fails_delivers_job_failed(service: Service, new_owner: Owners) -> None:
    """The reaper's verdict is a final status too: a job whose worker died on its last attempt fails
    with worker_lost in the API process, and the worker's sender announces it."""
    from app.core.db import utcnow
    from app.jobs.tables import JobStatus
    from app.tables import Job  # every table, so the foreign keys resolve

    client, dataset_id = new_owner("wh-reaped")
    with Receiver() as receiver:
        secret = make_secret(client)
        job_id = f"job_reaped{uuid.uuid4().hex[:12]}"
        long_ago = utcnow().replace(year=2020)
        with Session(service.engine) as session:
            # What a worker that died on the job's last attempt leaves behind: running, silent.
            owner_id = session.execute(
                sa.text("SELECT owner_id FROM datasets WHERE id = :d"), {"d": dataset_id}
            ).scalar_one()
            session.add(
                Job(id=job_id, owner_id=owner_id, dataset_id=dataset_id, status=JobStatus.RUNNING,
                    base_model=TINY_SPEC, class_names=["cat", "dog"], descriptions={}, hyperparameters={},
                    seed=1, metadata_={}, webhook_url=receiver.url, warnings=[], metrics={},
                    attempts=3, worker_id="gone:1", heartbeat_at=long_ago, created_at=long_ago,
                    queued_at=long_ago, started_at=long_ago)
            )  # fmt: skip
            session.commit()
        job = wait_delivery(client, job_id, "delivered", timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    [call] = receiver.calls
    assert signature_valid(secret, call.headers, call.body)
    sent = json.loads(call.body)
    assert sent["type"] == "job.failed" and sent["data"]["error"]["code"] == "worker_lost"
