"""Fuzzing the running API from its own OpenAPI document (schemathesis): whatever a client sends,
valid or not, the answer is never a 5xx.

Two passes against the real API process, with a valid key, on a small fixed budget:

1. schemathesis' own run over every operation: documented examples, coverage of the schema's
   boundaries (missing fields, wrong types, lengths and limits), random valid and invalid inputs,
   and stateful sequences that reuse the ids the API hands out (create, read, delete).
2. every operation that names a dataset, job or model, fuzzed with the real ids of the fuzzer's own
   dataset, finished job and model, so that what runs after the lookup is fuzzed too; a destructive
   operation gets a fresh resource each time.

Both are deterministic (fixed seed). Deeper runs:
``LAFTER_FUZZ_MAX_EXAMPLES=500 LAFTER_FUZZ_RANDOM=1 pytest tests/service/test_fuzz.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.engine import Status, events, from_schema

from tests.service.conftest import MIN_IMAGES, Service
from tests.service.helpers import (
    TINY_HP,
    TINY_SPEC,
    bearer,
    create_key,
    png,
    poll_job,
    two_class_images,
    upload,
)

MAX_EXAMPLES = int(os.environ.get("LAFTER_FUZZ_MAX_EXAMPLES", "25"))  # per operation and pass
RANDOM = bool(os.environ.get("LAFTER_FUZZ_RANDOM"))


class Fuzzer:
    """The fuzzer's own owner, key, dataset (with images), finished job and model."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.key = create_key(service.env, "fuzzer")
        self.client = httpx.Client(base_url=service.url, headers=bearer(self.key), timeout=60)
        ds = self.client.post("/v1/datasets", json={"name": "fuzz"}).json()
        uploaded = upload(self.client, ds["id"], two_class_images(MIN_IMAGES, offset=13000))
        assert uploaded.status_code == 200, uploaded.text
        image_id = uploaded.json()["accepted"][0]["image_id"]
        r = self.client.post(
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
        job = poll_job(self.client, r.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job
        self.real = {
            "dataset_id": ds["id"],
            "job_id": job["id"],
            "model_id": job["model_id"],
            "image_id": image_id,
        }

    def fresh(self, name: str) -> str:
        """Something that may be destroyed: a new dataset, or a copy of the fuzzer's model."""
        if name == "dataset_id":
            made = self.client.post("/v1/datasets", json={"name": "to delete"})
            assert made.status_code == 201, made.text
            return str(made.json()["id"])
        if name == "model_id":
            new = f"model_{uuid.uuid4().hex[:28]}"
            with self.service.engine.begin() as conn:
                for table, key in (("models", "id"), ("model_artifacts", "model_id")):
                    cols = [c["name"] for c in sa.inspect(conn).get_columns(table)]
                    select = ", ".join(":new" if c == key else c for c in cols)
                    conn.execute(
                        sa.text(
                            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {select} FROM {table} "
                            f"WHERE {key} = :old"
                        ),
                        {"new": new, "old": self.real["model_id"]},
                    )
            return new
        return self.real[name]

    def close(self) -> None:
        # Stop whatever the fuzzer managed to start, so that no later test waits behind it.
        for job in self.client.get("/v1/jobs", params={"limit": 100}).json()["data"]:
            if job["status"] in ("queued", "running"):
                self.client.post(f"/v1/jobs/{job['id']}/cancel")
        self.client.close()


@pytest.fixture(scope="module")
def fuzzer(service: Service) -> Iterator[Fuzzer]:
    f = Fuzzer(service)
    yield f
    f.close()


def _schema(fuzzer: Fuzzer, key: str) -> Any:
    base = {
        # The key is sent with every request; the 401 paths are tested in test_auth.py.
        "headers": bearer(key),
        "generation": {"max-examples": MAX_EXAMPLES, "with-security-parameters": False, "database": "none"},
        "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
        "request-timeout": 60,
    }
    if not RANDOM:
        base["seed"] = 20261126
    cfg = schemathesis.Config.from_dict(base)
    return schemathesis.openapi.from_url(f"{fuzzer.service.url}/openapi.json", config=cfg)


def test_schemathesis_run_finds_no_5xx(fuzzer: Fuzzer) -> None:
    # An owner of its own: its stateful sequences delete what the lists show them.
    schema = _schema(fuzzer, create_key(fuzzer.service.env, "fuzzer-stateful"))
    labels = {result.ok().label for result in schema.get_all_operations()}
    # Every operation of the API is fuzzed: nothing is excluded.
    assert {"POST /v1/jobs", "POST /v1/datasets/{dataset_id}/images", "POST /v1/classify"} <= labels
    failures: list[str] = []
    tested: set[str] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            if event.label:
                tested.add(event.label)
            if event.status == Status.FAILURE:
                for nodes in event.recorder.checks.values():
                    for node in nodes:
                        if node.status == Status.FAILURE and node.failure_info is not None:
                            info = node.failure_info
                            failures.append(f"{event.label}: {info.failure.title}\n    {info.code_sample}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"schemathesis error: {event}")
    assert not failures, "5xx answers:\n" + "\n".join(dict.fromkeys(failures))
    assert labels <= tested, labels - tested


def _fuzz_with_real_ids(operation: Any, fuzzer: Fuzzer) -> list[str]:
    """MAX_EXAMPLES valid and invalid requests to one operation, its ids real; the 5xx answers."""
    found: list[str] = []
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the report shows the input as sent
    )
    def run(case: Any) -> None:
        destructive = case.method.upper() == "DELETE"
        for name in list(case.path_parameters or {}):
            if name in fuzzer.real:
                case.path_parameters[name] = fuzzer.fresh(name) if destructive else fuzzer.real[name]
        if isinstance(case.body, dict) and "dataset_id" in case.body:
            case.body["dataset_id"] = fuzzer.real["dataset_id"]
        response = case.call(base_url=fuzzer.service.url, headers=bearer(fuzzer.key), timeout=60)
        if response.status_code >= 500:
            found.append(
                f"{case.method.upper()} {case.formatted_path} -> {response.status_code} {response.text[:300]}\n"
                f"    {case.as_curl_command(headers=bearer('KEY'))[:1500]}"
            )

    run()
    return found


def test_fuzzing_with_real_ids_finds_no_5xx(fuzzer: Fuzzer) -> None:
    schema = _schema(fuzzer, fuzzer.key)
    operations = [result.ok() for result in schema.get_all_operations()]
    with_ids = [
        op for op in operations if "{" in op.path or (op.method.upper() == "POST" and op.path == "/v1/jobs")
    ]
    assert len(with_ids) >= 10, [op.label for op in with_ids]
    failures = [f for op in with_ids for f in _fuzz_with_real_ids(op, fuzzer)]
    assert not failures, "5xx answers:\n" + "\n".join(failures)


# Each 5xx found (by this fuzzer, or by probing the same classes of input by hand after it found the
# first), as the request that triggered it and the 4xx it gets now.
REGRESSIONS: list[tuple[str, str, dict[str, Any], int, str]] = [
    # PostgreSQL text cannot hold NUL: the fuzzer's first find, a dataset name.
    ("nul-in-dataset-name", "POST", {"url": "/v1/datasets", "json": {"name": "a\x00b"}}, 422, "validation_error"),
    ("nul-in-path-id", "GET", {"url": "/v1/datasets/ds_%00"}, 400, "nul_in_url"),
    ("nul-in-cursor", "GET", {"url": "/v1/jobs", "params": {"after": "job_\x00"}}, 400, "nul_in_url"),
    ("nul-in-job-dataset-id", "POST", {"url": "/v1/jobs", "json": {"dataset_id": "\x00", "class_names": ["a", "b"]}}, 422, "validation_error"),
    ("nul-in-class-name", "POST", {"url": "/v1/jobs", "json": {"dataset_id": "REAL", "class_names": ["a\x00", "b"]}}, 422, "validation_error"),
    ("nul-in-eval-label", "UPLOAD", {"data": {"split": "eval", "labels": '{"q.png": "c\\u0000t"}'}}, 422, "labels_invalid"),
    # JSON cannot hold NaN or Infinity (Python's parser accepts both, and 1e999 becomes Infinity).
    ("infinity-in-dataset-metadata", "POST", {"url": "/v1/datasets", "content": b'{"name": "x", "metadata": {"a": [1e999]}}'}, 422, "validation_error"),
    ("nan-in-job-metadata", "POST", {"url": "/v1/jobs", "content": b'{"dataset_id": "REAL", "class_names": ["a", "b"], "base_model": "SPEC", "metadata": {"a": NaN}}'}, 422, "validation_error"),
    # Event ids are BIGINTs.
    ("event-cursor-beyond-bigint", "GET", {"url": "/v1/jobs/JOB/events", "params": {"after": str(2**64)}}, 422, "cursor_invalid"),
    # The file system refuses to look at an over-long path (ENAMETOOLONG).
    ("over-long-checkpoint-path", "POST", {"url": "/v1/jobs", "json": {"dataset_id": "REAL", "class_names": ["a", "b"], "base_model": "ViT-B-32::MODELS/" + "a" * 900}}, 422, "base_model_invalid"),
    # Outside the local model folders nothing is looked at.
    ("over-long-path-outside-the-model-folders", "POST", {"url": "/v1/jobs", "json": {"dataset_id": "REAL", "class_names": ["a", "b"], "base_model": "ViT-B-32::/tmp/" + "a" * 900}}, 422, "base_model_not_allowed"),
    # Longer than its column.
    ("webhook-url-longer-than-its-column", "POST", {"url": "/v1/jobs", "json": {"dataset_id": "REAL", "class_names": ["a", "b"], "base_model": "SPEC", "webhook_url": "http://example.com/" + "a" * 2000}}, 422, "webhook_url_invalid"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "request_", "status", "code"), [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS]
)
def test_fuzzing_regressions(
    fuzzer: Fuzzer, method: str, request_: dict[str, Any], status: int, code: str
) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return (
                value.replace("REAL", fuzzer.real["dataset_id"])
                .replace("JOB", fuzzer.real["job_id"])
                .replace("SPEC", TINY_SPEC)
                .replace("MODELS", str(fuzzer.service.root / "models"))
            )
        if isinstance(value, bytes):
            return fill(value.decode()).encode()
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    kwargs = fill(request_)
    if "content" in kwargs:
        kwargs["headers"] = {"content-type": "application/json"}
    if method == "UPLOAD":
        r = upload(fuzzer.client, fuzzer.real["dataset_id"], [("q.png", png(13999))], **kwargs["data"])
    else:
        r = fuzzer.client.request(method, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code, r.text
