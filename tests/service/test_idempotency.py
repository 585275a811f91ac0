"""``Idempotency-Key`` on ``POST /v1/jobs``: a client that retries (after a timeout, or many times
at once) gets one job and one queue message; keys expire after ``LAFTER_IDEMPOTENCY_TTL_S``; and
they are scoped per owner.

These tests run an API process of their own: its own database (so no other process's reaper sends
its jobs), and a queue of its own on the test broker that no worker reads, so every Celery message
it sends stays there to be counted. It sends each job at once (no per-owner cap) and runs no
reaper, so a message comes only from job creation."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from app.core.migrate import upgrade_head
from tests.service.conftest import MIN_IMAGES, REDIS_URL, Service
from tests.service.helpers import (
    TINY_HP,
    TINY_SPEC,
    api_process,
    bearer,
    create_key,
    scratch_database,
    two_class_images,
    upload,
)

TTL_S = 60


@dataclass
class Api:
    url: str
    queue: str
    redis: redis.Redis
    engine: sa.Engine  # its database
    owners: dict[str, tuple[str, str]]  # owner -> (api key, dataset id)

    def client(self, owner: str, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=bearer(self.owners[owner][0]), **kwargs)

    def body(self, owner: str, **overrides: Any) -> dict[str, Any]:
        return {
            "dataset_id": self.owners[owner][1],
            "class_names": ["cat", "dog"],
            "base_model": TINY_SPEC,
            "descriptions": {"source": "templates"},
            "hyperparameters": TINY_HP,
            **overrides,
        }

    def messages_for(self, job_id: str) -> int:
        """How many Celery messages were sent for this job (nobody consumes this queue)."""
        raw_messages: list[bytes] = self.redis.lrange(self.queue, 0, -1)  # type: ignore[assignment]
        sent = [json.loads(raw)["headers"]["argsrepr"] for raw in raw_messages]
        return sum(job_id in args for args in sent)


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[Api]:
    with scratch_database("lafter_idem") as database_url:
        yield from _idempotency_api(service, database_url)


def _idempotency_api(service: Service, database_url: str) -> Iterator[Api]:
    upgrade_head(database_url)
    queue = f"idem-{uuid.uuid4().hex[:8]}"
    env = {
        **service.env,
        "LAFTER_DATABASE_URL": database_url,
        "LAFTER_GPU_QUEUE": queue,
        "LAFTER_IDEMPOTENCY_TTL_S": str(TTL_S),
        "LAFTER_MAX_ACTIVE_JOBS_PER_OWNER": "0",
        "LAFTER_REAPER_INTERVAL_S": "0",
    }
    client = redis.Redis.from_url(REDIS_URL)
    engine = sa.create_engine(database_url)
    with api_process(env, service.logs / "api-idempotency.log") as url:
        owners = {}
        for i, owner in enumerate(("idem-a", "idem-b")):
            key = create_key(env, owner)
            with httpx.Client(base_url=url, headers=bearer(key), timeout=60) as c:
                ds = c.post("/v1/datasets", json={"name": owner}).json()
                r = upload(c, ds["id"], two_class_images(MIN_IMAGES, offset=12000 + 100 * i))
                assert r.status_code == 200, r.text
            owners[owner] = (key, ds["id"])
        yield Api(url, queue, client, engine, owners)
    engine.dispose()
    client.delete(queue)


def _jobs_with_key(api: Api, owner: str, key: str) -> list[str]:
    with api.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id FROM jobs WHERE owner_id = :o AND idempotency_key = :k"),
            {"o": owner, "k": key},
        )
        return [r[0] for r in rows]


def _age(api: Api, job_id: str, seconds: int) -> None:
    """Pretend the job was created ``seconds`` earlier than it was."""
    with api.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET created_at = created_at - make_interval(secs => :s) WHERE id = :i"),
            {"s": seconds, "i": job_id},
        )


def test_concurrent_retries_start_exactly_one_job(api: Api) -> None:
    key = f"burst-{uuid.uuid4().hex[:6]}"
    body = api.body("idem-a")
    n = 8
    barrier = threading.Barrier(n)
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with api.client("idem-a", timeout=60) as c:
                barrier.wait(timeout=30)
                responses.append(c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert sorted(r.status_code for r in responses) == [200] * (n - 1) + [202], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    (job_id,) = ids
    assert _jobs_with_key(api, "idem-a", key) == [job_id]
    assert api.messages_for(job_id) == 1


def test_a_retry_after_a_client_timeout_gets_the_same_job(api: Api) -> None:
    key = f"timeout-{uuid.uuid4().hex[:6]}"
    body = api.body("idem-a", class_names=["owl", "hawk"])
    # The client gives up while the server is still working (or has just finished) ...
    with (
        api.client("idem-a", timeout=httpx.Timeout(30, read=0.02)) as impatient,
        contextlib.suppress(httpx.TimeoutException),
    ):
        impatient.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    # ... and retries, twice.
    with api.client("idem-a", timeout=60) as c:
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        second = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code in (200, 202) and second.status_code == 200, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"]
    assert _jobs_with_key(api, "idem-a", key) == [first.json()["id"]]
    assert api.messages_for(first.json()["id"]) == 1


def test_a_key_expires_after_the_ttl(api: Api) -> None:
    key = f"ttl-{uuid.uuid4().hex[:6]}"
    body = api.body("idem-b", class_names=["oak", "elm"])
    headers = {"Idempotency-Key": key}
    with api.client("idem-b", timeout=60) as c:
        first = c.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == 202, first.text
        _age(api, first.json()["id"], TTL_S // 2)
        again = c.post("/v1/jobs", json=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert c.post("/v1/jobs", json={**body, "seed": 1}, headers=headers).status_code == 409

        _age(api, first.json()["id"], TTL_S // 2 + 1)  # now older than the TTL
        fresh = c.post("/v1/jobs", json=body, headers=headers)
        assert fresh.status_code == 202, fresh.text
        assert fresh.json()["id"] != first.json()["id"]
        assert c.post("/v1/jobs", json=body, headers=headers).json()["id"] == fresh.json()["id"]
        # The old job is untouched, apart from giving up the key.
        assert c.get(f"/v1/jobs/{first.json()['id']}").json()["status"] == "queued"
        assert _jobs_with_key(api, "idem-b", key) == [fresh.json()["id"]]

        # An expired key may come back with another body too: that is a new request, not a conflict.
        _age(api, fresh.json()["id"], TTL_S + 1)
        other = c.post("/v1/jobs", json={**body, "seed": 7}, headers=headers)
        assert other.status_code == 202 and other.json()["seed"] == 7, other.text
    for job_id in (first.json()["id"], fresh.json()["id"], other.json()["id"]):
        assert api.messages_for(job_id) == 1


def test_keys_are_scoped_per_owner(api: Api) -> None:
    key = f"shared-{uuid.uuid4().hex[:6]}"
    headers = {"Idempotency-Key": key}
    with api.client("idem-a", timeout=60) as a, api.client("idem-b", timeout=60) as b:
        mine = a.post("/v1/jobs", json=api.body("idem-a", class_names=["sun", "moon"]), headers=headers)
        # The other owner's body differs: under one global key space this would be a 409.
        theirs = b.post("/v1/jobs", json=api.body("idem-b", class_names=["sea", "sky"]), headers=headers)
        assert mine.status_code == 202 and theirs.status_code == 202, (mine.text, theirs.text)
        assert mine.json()["id"] != theirs.json()["id"]
        again = b.post("/v1/jobs", json=api.body("idem-b", class_names=["sea", "sky"]), headers=headers)
        assert again.status_code == 200 and again.json()["id"] == theirs.json()["id"]
        assert a.get(f"/v1/jobs/{theirs.json()['id']}").status_code == 404
    assert _jobs_with_key(api, "idem-a", key) == [mine.json()["id"]]
    assert _jobs_with_key(api, "idem-b", key) == [theirs.json()["id"]]
