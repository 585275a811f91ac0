"""Bad inputs get their own 4xx code as problem JSON and leave nothing half-written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import MAX_FILE_BYTES, MAX_REQUEST_BYTES, MIN_IMAGES, Service
from tests.service.helpers import TINY_HP, TINY_SPEC, png, two_class_images, upload, zip_of


@pytest.fixture
def unchanged(service: Service) -> Iterator[None]:
    """Whatever the test does, no row and no blob may be left behind."""
    tables = ("datasets", "dataset_images", "jobs", "job_events", "models", "model_artifacts")
    before = {t: service.count(t) for t in tables}
    blobs = service.blob_count()
    yield
    assert {t: service.count(t) for t in tables} == before
    assert service.blob_count() == blobs


@pytest.fixture(scope="module")
def ready_dataset(service: Service) -> dict[str, Any]:
    ds = service.client.post("/v1/datasets", json={"name": "bad-inputs"}).json()
    r = upload(service.client, ds["id"], two_class_images(MIN_IMAGES, offset=2000))
    assert r.status_code == 200, r.text
    return ds


@pytest.fixture(scope="module")
def small_dataset(service: Service) -> dict[str, Any]:
    ds = service.client.post("/v1/datasets", json={"name": "too-small"}).json()
    r = upload(service.client, ds["id"], two_class_images(MIN_IMAGES - 1, offset=3000))
    assert r.status_code == 200, r.text
    return ds


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


def test_corrupt_image(service: Service, ready_dataset: dict[str, Any], unchanged: None) -> None:
    r = upload(service.client, ready_dataset["id"], [("broken.png", png(1)[:100])])
    body = problem(r, 422, "image_corrupt")
    assert body["rejected"][0]["filename"] == "broken.png"


def test_non_image(service: Service, ready_dataset: dict[str, Any], unchanged: None) -> None:
    r = upload(service.client, ready_dataset["id"], [("notes.txt", b"just some text, not pixels\n" * 10)])
    problem(r, 422, "not_an_image")


def test_oversized_file(service: Service, ready_dataset: dict[str, Any], unchanged: None) -> None:
    big = b"\x89PNG" + b"\0" * (MAX_FILE_BYTES + 10)
    r = upload(service.client, ready_dataset["id"], [("huge.png", big)])
    problem(r, 413, "file_too_large")


def test_oversized_request_is_answered_not_dropped(
    service: Service, ready_dataset: dict[str, Any], unchanged: None
) -> None:
    parts = [
        (f"part{i}.png", b"\0" * (MAX_FILE_BYTES - 10))
        for i in range(MAX_REQUEST_BYTES // MAX_FILE_BYTES + 2)
    ]
    r = upload(service.client, ready_dataset["id"], parts)
    problem(r, 413, "request_too_large")


def test_oversized_archive_member(service: Service, ready_dataset: dict[str, Any], unchanged: None) -> None:
    archive = zip_of({"a/huge.png": b"\0" * (MAX_FILE_BYTES + 1)})
    r = upload(service.client, ready_dataset["id"], [("a.zip", archive)])
    problem(r, 413, "file_too_large")


def test_partial_success_keeps_the_good_files(service: Service) -> None:
    ds = service.client.post("/v1/datasets", json={"name": "partial"}).json()
    r = upload(
        service.client, ds["id"], [("good.png", png(4000)), ("bad.png", b"nope"), ("good2.png", png(4001))]
    )
    assert r.status_code == 200, r.text
    report = r.json()
    assert [a["filename"] for a in report["accepted"]] == ["good.png", "good2.png"]
    assert report["rejected"] == [
        {"filename": "bad.png", "code": "not_an_image", "message": report["rejected"][0]["message"]}
    ]
    assert report["dataset"]["image_count"] == 2


def job_body(dataset: str, **overrides: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset,
        "class_names": ["cat", "dog"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        "hyperparameters": TINY_HP,
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"class_names": ["cat", "  "]}, "class_name_empty", "class_names.1"),
        ({"class_names": ["cat", "Cat "]}, "class_names_duplicate", "class_names.1"),
        ({"class_names": ["cat"]}, "class_names_too_few", "class_names"),
        ({"dataset_id": "ds_doesnotexist"}, "dataset_not_found", "dataset_id"),
        ({"base_model": "NoSuchArch::openai"}, "base_model_invalid", "base_model"),
        ({"descriptions": {"source": "provided"}}, "descriptions_invalid", "descriptions.provided"),
    ],
)
def test_job_validation(
    service: Service,
    ready_dataset: dict[str, Any],
    unchanged: None,
    overrides: dict[str, Any],
    code: str,
    field: str,
) -> None:
    body = job_body(ready_dataset["id"], **overrides)
    r = service.client.post("/v1/jobs", json=body)
    assert problem(r, 422, code)["field"] == field


def test_too_few_images(service: Service, small_dataset: dict[str, Any], unchanged: None) -> None:
    r = service.client.post("/v1/jobs", json=job_body(small_dataset["id"]))
    assert problem(r, 422, "dataset_too_small")["field"] == "dataset_id"


def test_schema_errors_name_the_field(
    service: Service, ready_dataset: dict[str, Any], unchanged: None
) -> None:
    r = service.client.post("/v1/jobs", json=job_body(ready_dataset["id"], hyperparameters={"epochs": 0}))
    body = problem(r, 422, "validation_error")
    assert body["field"].startswith("hyperparameters")
    r = service.client.post("/v1/jobs", json={"class_names": ["a", "b"]})
    assert problem(r, 422, "validation_error")["field"] == "dataset_id"


@pytest.mark.parametrize(
    ("hyperparameters", "field"),
    [
        ({"epochs": 1001}, "hyperparameters.epochs"),
        ({"epochs": 0}, "hyperparameters.epochs"),
        ({"text_steps": 100_001}, "hyperparameters.text_steps"),
        ({"max_steps": 10**7 + 1}, "hyperparameters.max_steps"),
        ({"max_steps": "auto"}, "hyperparameters.max_steps"),
        ({"batch_size": 4097}, "hyperparameters.batch_size"),
        ({"batch_size": True}, "hyperparameters.batch_size"),
        ({"prompt_tokens": 1001}, "hyperparameters.prompt_tokens"),
        ({"prompt_tokens": "many"}, "hyperparameters.prompt_tokens"),
        ({"epochs": 10**30}, "hyperparameters.epochs"),
        ({"balance_tau": 0}, "hyperparameters.balance_tau"),
        ({"balance_tau": 2.01}, "hyperparameters.balance_tau"),
        ({"learning_rate": 0}, "hyperparameters.learning_rate"),
        ({"pseudo_label_balance": "sometimes"}, "hyperparameters.pseudo_label_balance"),
    ],
)
def test_hyperparameters_are_bounded_at_submit(
    service: Service,
    ready_dataset: dict[str, Any],
    unchanged: None,
    hyperparameters: dict[str, Any],
    field: str,
) -> None:
    body = job_body(ready_dataset["id"], hyperparameters={**TINY_HP, **hyperparameters})
    r = service.client.post("/v1/jobs", json=body)
    problem_body = problem(r, 422, "validation_error")
    assert problem_body["field"] == field, problem_body
    assert field.split(".")[-1] in problem_body["detail"]


def test_unknown_recipe_is_refused(service: Service, ready_dataset: dict[str, Any], unchanged: None) -> None:
    r = service.client.post("/v1/jobs", json=job_body(ready_dataset["id"], recipe="fast"))
    assert problem(r, 422, "validation_error")["field"] == "recipe"


def test_unknown_ids_are_404(service: Service) -> None:
    problem(service.client.get("/v1/jobs/job_nope"), 404, "job_not_found")
    problem(service.client.get("/v1/models/model_nope"), 404, "model_not_found")
    problem(service.client.get("/v1/datasets/ds_nope"), 404, "dataset_not_found")
    problem(upload(service.client, "ds_nope", [("a.png", png(1))]), 404, "dataset_not_found")
