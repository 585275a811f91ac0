"""The steps most service tests share, each asserting its own success: a dataset with images, a
job on the tiny test model, and waiting for it."""

from __future__ import annotations

from typing import Any

import httpx

from tests.service.helpers import TINY_HP, TINY_SPEC, poll_job, two_class_images, upload

FINAL = {"succeeded", "failed", "cancelled"}


def create_dataset(client: httpx.Client, name: str, images: int, offset: int) -> str:
    """A dataset holding ``images`` two-colour PNGs (distinct per ``offset``); its id."""
    ds = client.post("/v1/datasets", json={"name": name})
    assert ds.status_code == 201, ds.text
    dataset_id = str(ds.json()["id"])
    r = upload(client, dataset_id, two_class_images(images, offset=offset))
    assert r.status_code == 200, r.text
    return dataset_id


def job_body(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    """A job on the tiny test model with template descriptions; ``overrides`` replace fields."""
    return {
        "dataset_id": dataset_id,
        "class_names": ["apple", "pear"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        "hyperparameters": TINY_HP,
        **overrides,
    }


def submit_job(client: httpx.Client, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=job_body(dataset_id, **overrides))
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def run_job(
    client: httpx.Client, dataset_id: str, timeout: float = 120.0, **overrides: Any
) -> dict[str, Any]:
    """Submit a job and wait for its final status; the final job object."""
    return poll_job(client, submit_job(client, dataset_id, **overrides)["id"], FINAL, timeout)
