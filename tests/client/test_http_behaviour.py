"""The client's HTTP behaviour against a real server on 127.0.0.1 that answers from a script:
retries with backoff (and Retry-After), one Idempotency-Key over a job submission's tries, which
requests are never repeated, the error mapping, and ``jobs.wait`` falling back to polling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import lafter_client
from lafter_client import Client
from lafter_client._transport import Transport
from tests.client.scripted_server import Answer, ScriptedServer, scripted_server
from tests.service.helpers import free_port

DATASET = {"id": "ds_1", "name": "d", "metadata": {}, "status": "empty", "image_count": 0,
           "eval_image_count": 0, "total_bytes": 0, "created_at": "2025-01-01T00:00:00Z",
           "updated_at": "2025-01-01T00:00:00Z", "a_field_from_a_newer_service": 1}  # fmt: skip


def job(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "job_1", "status": status, "base_model": "b", "class_names": ["a", "b"], **extra}


def problem(status: int, code: str, detail: str = "it went wrong", **extra: Any) -> dict[str, Any]:
    return {"type": f"https://lafter.dev/problems/{code}", "status": status, "code": code, "detail": detail,
            **extra}  # fmt: skip


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with scripted_server() as s:
        yield s


def client_of(server: ScriptedServer, **kwargs: Any) -> Client:
    return Client(base_url=server.url, api_key="lft_test_key", backoff_s=0.05, **kwargs)


def test_503_then_200_is_retried_after_the_servers_retry_after(server: ScriptedServer) -> None:
    server.on(
        "GET",
        "/v1/datasets/ds_1",
        Answer(503, problem(503, "database_unavailable"), headers={"Retry-After": "1"}),
        Answer(200, DATASET),
    )
    started = time.monotonic()
    with client_of(server) as client:
        ds = client.datasets.get("ds_1")
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured, not the 0.05 s backoff
    assert ds.id == "ds_1" and ds.model_extra == {"a_field_from_a_newer_service": 1}
    seen = server.requests_to("GET", "/v1/datasets/ds_1")
    assert len(seen) == 2
    assert all(s.headers["Authorization"] == "Bearer lft_test_key" for s in seen)


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    transport = Transport("http://127.0.0.1:1", None, backoff_s=0.5, max_backoff_s=3.0)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = {transport.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered
    transport.close()


def test_a_job_submission_keeps_one_idempotency_key_over_its_retries(server: ScriptedServer) -> None:
    server.on(
        "POST",
        "/v1/jobs",
        Answer(503, problem(503, "database_unavailable")),
        Answer(429, problem(429, "rate_limited"), headers={"Retry-After": "0"}),
        Answer(202, job("queued")),
    )
    with client_of(server) as client:
        created = client.jobs.create("ds_1", ["a", "b"], hyperparameters={"epochs": 1})
        assert created.status == "queued" and not created.is_final
        keys = {s.headers["Idempotency-Key"] for s in server.requests_to("POST", "/v1/jobs")}
        assert len(server.requests_to("POST", "/v1/jobs")) == 3 and len(keys) == 1
        client.jobs.create("ds_1", ["a", "b"])  # another call: another key
    keys = {s.headers["Idempotency-Key"] for s in server.requests_to("POST", "/v1/jobs")}
    assert len(keys) == 2


def test_gives_up_after_max_retries_with_the_problem_code(server: ScriptedServer) -> None:
    server.on("GET", "/v1/jobs/job_1", Answer(503, problem(503, "database_unavailable", "db away")))
    with (
        client_of(server, max_retries=2) as client,
        pytest.raises(lafter_client.ServiceUnavailableError) as err,
    ):
        client.jobs.get("job_1")
    assert (
        err.value.status == 503 and err.value.code == "database_unavailable" and err.value.detail == "db away"
    )
    assert isinstance(err.value, lafter_client.ServerError)
    assert len(server.requests_to("GET", "/v1/jobs/job_1")) == 3


def test_a_refused_connection_is_retried_then_raises_connection_error() -> None:
    started = time.monotonic()
    client = Client(base_url=f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_s=0.2)
    with client, pytest.raises(lafter_client.ConnectionError) as err:
        client.datasets.create("x")  # never reached the server: safe to repeat even a POST
    assert err.value.status is None and err.value.code == "connection_error"
    assert time.monotonic() - started >= 0.1 + 0.2  # two backoffs (at least half of 0.2 and 0.4)


def test_a_post_that_may_have_reached_the_server_is_not_repeated(server: ScriptedServer) -> None:
    server.on("POST", "/v1/datasets", Answer(drop=True))
    with client_of(server) as client, pytest.raises(lafter_client.ConnectionError):
        client.datasets.create("x")
    # The connection was cut after the request went out: a second try could make a second dataset.
    assert len(server.requests_to("POST", "/v1/datasets")) == 1


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "nul_in_url", lafter_client.BadRequestError),
        (401, "auth_invalid", lafter_client.AuthenticationError),
        (404, "dataset_not_found", lafter_client.NotFoundError),
        (409, "job_finished", lafter_client.ConflictError),
        (413, "request_too_large", lafter_client.PayloadTooLargeError),
        (422, "class_names_duplicate", lafter_client.ValidationError),
        (429, "rate_limited", lafter_client.RateLimitError),
        (500, "internal_error", lafter_client.ServerError),
    ],
)
def test_problem_json_becomes_a_typed_error(
    server: ScriptedServer, status: int, code: str, cls: type[lafter_client.LafterError]
) -> None:
    server.on("GET", "/v1/datasets/ds_1", Answer(status, problem(status, code, field="class_names.1"),
                                                 content_type="application/problem+json"))  # fmt: skip
    with client_of(server, max_retries=0) as client, pytest.raises(cls) as err:
        client.datasets.get("ds_1")
    assert type(err.value) is cls and isinstance(err.value, lafter_client.LafterError)
    assert (err.value.status, err.value.code, err.value.field) == (status, code, "class_names.1")
    assert err.value.detail == "it went wrong" and code in str(err.value)


def test_an_answer_without_problem_json_still_maps_by_status(server: ScriptedServer) -> None:
    server.on("GET", "/v1/models/m", Answer(502, b"<html>bad gateway</html>", content_type="text/html"))
    with client_of(server, max_retries=1) as client, pytest.raises(lafter_client.ServerError) as err:
        client.models.get("m")
    assert (
        err.value.status == 502 and err.value.code == "internal_error" and "bad gateway" in err.value.detail
    )
    assert len(server.requests_to("GET", "/v1/models/m")) == 2  # a GET is repeated on 502


def test_wait_falls_back_to_polling_when_there_is_no_event_stream(server: ScriptedServer) -> None:
    event = {"id": 1, "kind": "log", "stage": "describing", "message": "started", "data": {}}
    later = {"id": 2, "kind": "metric", "stage": "adapting", "step": 1, "data": {"loss": 0.5}}
    # An old service (or a proxy) that answers the stream request with JSON: the client polls.
    server.on(
        "GET",
        "/v1/jobs/job_1/events",
        Answer(200, {"data": [event], "has_more": False, "next_cursor": "1"}),
        Answer(200, {"data": [event], "has_more": False, "next_cursor": "1"}),
        Answer(200, {"data": [later], "has_more": False, "next_cursor": "2"}),
        Answer(200, {"data": [], "has_more": False, "next_cursor": "2"}),
    )
    server.on(
        "GET", "/v1/jobs/job_1", Answer(200, job("running")), Answer(200, job("succeeded", model_id="mdl_1"))
    )
    seen: list[lafter_client.JobEvent] = []
    with client_of(server) as client:
        final = client.jobs.wait("job_1", on_event=seen.append, timeout=30, poll_interval=0.05)
    assert final.status == "succeeded" and final.model_id == "mdl_1"
    assert [e.id for e in seen] == [1, 2]  # each event once, in order
    polls = server.requests_to("GET", "/v1/jobs/job_1/events")
    assert polls[0].headers["Accept"] == "text/event-stream"
    assert "after=1" in polls[2].path


def test_wait_times_out(server: ScriptedServer) -> None:
    server.on("GET", "/v1/jobs/job_1/events", Answer(200, {"data": [], "has_more": False}))
    server.on("GET", "/v1/jobs/job_1", Answer(200, job("running")))
    with client_of(server) as client, pytest.raises(lafter_client.TimeoutError) as err:
        client.jobs.wait("job_1", timeout=0.5, poll_interval=0.05)
    assert err.value.code == "wait_timeout"
