"""``GET /v1/jobs/{id}/events`` as Server-Sent Events, against the real API and worker: every event
in order and then ``done``, resumption with ``Last-Event-ID`` without duplicates or gaps,
heartbeats, 404 for another owner's job, and a stream that outlives a database outage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.service.conftest import MIN_IMAGES, Service
from tests.service.factories import create_dataset, submit_job
from tests.service.helpers import (
    LONG_HP,
    TINY_HP,
    create_key,
    wait_for,
)
from tests.service.test_db_outage import TcpProxy, api_behind_proxy

SSE = {"Accept": "text/event-stream"}


@dataclass
class Message:
    """One SSE message, or a comment line (``comment`` set, the rest empty)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    fields: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


def messages(response: httpx.Response) -> Iterator[Message]:
    """The SSE wire format read by hand (the client package has its own reader; this one checks the
    server independently of it)."""
    current = Message()
    for line in response.iter_lines():
        if line == "":
            if current.fields:
                yield current
            current = Message()
            continue
        if line.startswith(":"):
            yield Message(comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        current.fields.append(name)
        if name == "data":
            current.data = f"{current.data}\n{value}" if current.data else value
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value
        elif name == "retry":
            current.retry = int(value)


def dataset(client: httpx.Client) -> str:
    return create_dataset(client, "stream", MIN_IMAGES, offset=7000)


def submit(client: httpx.Client, dataset_id: str, hp: dict[str, Any]) -> str:
    return str(submit_job(client, dataset_id, class_names=["red", "blue"], hyperparameters=hp)["id"])


def json_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
    assert r.status_code == 200, r.text
    assert not r.json()["has_more"]
    data: list[dict[str, Any]] = r.json()["data"]
    return data


@pytest.fixture(scope="module")
def dataset_id(service: Service) -> str:
    return dataset(service.client)


def test_stream_sends_every_event_in_order_then_done(service: Service, dataset_id: str) -> None:
    client = service.client
    job_id = submit(client, dataset_id, TINY_HP)
    got: list[Message] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        got.extend(messages(r))  # to the end: the server closes the stream after ``done``
    assert got[0].retry is not None and got[0].retry > 0
    sent = [m for m in got if m.comment is None and m.retry is None]
    assert sent[-1].event == "done" and sent[-1].id is None
    final = sent[-1].json()
    assert final["id"] == job_id and final["status"] == "succeeded" and final["model_id"]
    events = sent[:-1]
    assert [int(m.id or 0) for m in events] == list(range(1, len(events) + 1))
    assert all(m.event == m.json()["kind"] and int(m.id or 0) == m.json()["id"] for m in events)
    # The same events as the JSON route, byte for byte in content.
    assert [m.json() for m in events] == json_events(client, job_id)

    # Training progress is in the events: stage, loss, pseudo-label histogram, images/s, percent.
    points = [m.json() for m in events if m.event == "metric" and m.json()["stage"] == "adapting"]
    assert points, [m.json() for m in events]
    last = points[-1]["data"]
    assert last["loss"] > 0 and last["images_per_s"] > 0
    assert len(last["pseudo_label_histogram"]) == 2 and sum(last["pseudo_label_histogram"]) > 0
    assert last["total_steps"] == 2 and 0 < last["percent"] <= 100
    assert any(m.json()["stage"] == "training_text_classifier" and "loss" in m.json()["data"] for m in events)

    # Resuming: ?after= and Last-Event-ID (which wins, as an EventSource reconnecting sends it on
    # the URL it first opened); a final job's stream replays what is left and ends.
    for params, headers, first in (({"after": 3}, {}, 4), ({"after": 1}, {"Last-Event-ID": "5"}, 6)):
        with client.stream(
            "GET", f"/v1/jobs/{job_id}/events", params=params, headers={**SSE, **headers}
        ) as r:
            rest = [m for m in messages(r) if m.comment is None and m.retry is None]
        assert [int(m.id or 0) for m in rest[:-1]] == list(range(first, len(events) + 1))
        assert rest[-1].event == "done" and rest[-1].json()["status"] == "succeeded"

    bad = client.get(f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": "not-a-number"})
    assert bad.status_code == 422 and bad.json()["code"] == "cursor_invalid", bad.text
    assert bad.json()["field"] == "Last-Event-ID"

    # Another owner: 404, as for the JSON route, before any stream starts.
    with service.client_for(create_key(service.env, "stream-stranger")) as stranger:
        for headers in (SSE, {}):
            r = stranger.get(f"/v1/jobs/{job_id}/events", headers=headers)
            assert r.status_code == 404, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "job_not_found"
    with service.client_for(None) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}/events", headers=SSE).status_code == 401


def test_live_stream_resumes_without_duplicates_or_gaps_and_ends_on_cancel(
    service: Service, dataset_id: str
) -> None:
    client = service.client
    job_id = submit(client, dataset_id, LONG_HP)
    ids: list[int] = []
    url = f"/v1/jobs/{job_id}/events"
    try:
        # First connection: until stage 2 has reported a few points, then the client drops it.
        with client.stream("GET", url, headers=SSE, timeout=120) as r:
            assert r.status_code == 200
            for m in messages(r):
                if m.id is not None:
                    ids.append(int(m.id))
                if m.event == "metric" and m.json()["stage"] == "adapting" and m.json()["step"] >= 30:
                    break
        assert ids == list(range(1, len(ids) + 1)), ids
        time.sleep(0.5)  # events written while no one listens are not lost

        heartbeats = 0
        done: Message | None = None
        cancelled_at: float | None = None
        resumed_from = ids[-1]
        with client.stream("GET", url, headers={**SSE, "Last-Event-ID": str(resumed_from)}, timeout=60) as r:
            started = time.monotonic()
            for m in messages(r):
                if m.comment == "heartbeat":
                    heartbeats += 1
                elif m.event == "done":
                    done = m
                elif m.id is not None:
                    ids.append(int(m.id))
                # Cancel once the resumed stream has shown heartbeats (0.5 s apart here) and events.
                if cancelled_at is None and heartbeats >= 2 and len(ids) > resumed_from:
                    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
                    cancelled_at = time.monotonic()
                assert time.monotonic() - started < 60, "the stream did not end after the cancel"
        assert done is not None and cancelled_at is not None
        assert done.json()["status"] == "cancelled"
        assert ids == list(range(1, len(ids) + 1)), "duplicates or gaps across the reconnection"
        assert ids == [e["id"] for e in json_events(client, job_id)]
    finally:
        client.post(f"/v1/jobs/{job_id}/cancel")


@pytest.fixture
def proxied_api(service: Service) -> Iterator[tuple[TcpProxy, httpx.Client]]:
    """A second API process that reaches Postgres through a proxy the test can cut."""
    with api_behind_proxy(
        service, "api-stream-outage.log", timeout=60, LAFTER_EVENTS_HEARTBEAT_S="0.3"
    ) as pair:
        yield pair


def test_stream_survives_a_database_outage(
    service: Service, dataset_id: str, proxied_api: tuple[TcpProxy, httpx.Client]
) -> None:
    proxy, proxied = proxied_api
    job_id = submit(service.client, dataset_id, LONG_HP)
    wait_for(
        lambda: service.client.get(f"/v1/jobs/{job_id}").json()["stage"] == "adapting",
        120,
        0.2,
        "stage 2",
    )
    ids: list[int] = []
    comments: list[str] = []
    done: Message | None = None
    phase = "before"
    cut_at = restored_at = 0.0
    try:
        with proxied.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE, timeout=60) as r:
            assert r.status_code == 200
            for m in messages(r):
                now = time.monotonic()
                if m.comment is not None:
                    comments.append(m.comment)
                elif m.event == "done":
                    done = m
                elif m.id is not None:
                    ids.append(int(m.id))
                if phase == "before" and len(ids) >= 5:
                    proxy.set("refuse")
                    phase, cut_at = "down", now
                    seen_before_cut = len(ids)
                elif phase == "down" and now - cut_at > 3:
                    # The stream stays open through the outage on its heartbeats and says why; the
                    # first failed poll may take a while on a busy box, hence no exact deadline.
                    if "database unavailable, retrying" not in comments:
                        assert now - cut_at < 30, comments
                        continue
                    proxy.set("up")
                    phase, restored_at = "up", now
                    seen_at_restore = len(ids)
                elif phase == "up" and len(ids) > seen_at_restore + 3:
                    assert service.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
                    phase = "cancelled"
                assert now - (restored_at or now) < 60, "no events after the database came back"
        assert phase == "cancelled" and done is not None, (phase, comments[-5:])
        assert done.json()["status"] == "cancelled"
        assert seen_at_restore >= seen_before_cut
        assert comments.count("heartbeat") >= 5  # 0.3 s apart over the 3 s outage and more
        assert ids == list(range(1, len(ids) + 1))
        assert ids == [e["id"] for e in json_events(service.client, job_id)]
    finally:
        proxy.set("up")
        service.client.post(f"/v1/jobs/{job_id}/cancel")
