"""The job's ``recipe`` reaches stage 2 through the real worker, and the job echoes what stage 2
really used: the recipe's choices for every hyperparameter left "auto", a value set explicitly
winning over the recipe."""

from __future__ import annotations

from typing import Any

import pytest

from lafter.finetune import AdaptConfig
from tests.service.conftest import MIN_IMAGES, Service
from tests.service.factories import create_dataset
from tests.service.helpers import TINY_SPEC, poll_job

# Stage 2 kept tiny, and nothing set that a recipe decides (prompt tokens, balancing, view strength).
HP: dict[str, Any] = {"text_steps": 5, "epochs": 1, "batch_size": 4, "max_steps": 2}
TINY_PATCHES = (32 // 8) ** 2  # tests/assets/tiny-vit.json: 32 px images, 8 px patches
TINY_WIDTH = 64
TINY_PROMPTS = 4  # round(50 * 16/49 * 64/768) = 1, raised to the floor of 4


@pytest.fixture(scope="module")
def dataset(service: Service) -> dict[str, Any]:
    return {"id": create_dataset(service.client, "recipes", MIN_IMAGES, offset=9100)}


def run(service: Service, dataset_id: str, **body: Any) -> dict[str, Any]:
    r = service.client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "class_names": ["red thing", "blue thing"],
            "base_model": TINY_SPEC,
            "descriptions": {"source": "templates"},
            "hyperparameters": HP,
            "seed": 5,
            **body,
        },
    )
    assert r.status_code == 202, r.text
    queued: dict[str, Any] = r.json()
    job = poll_job(service.client, queued["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return {"queued": queued, "job": job}


@pytest.fixture(scope="module")
def paper(service: Service, dataset: dict[str, Any]) -> dict[str, Any]:
    return run(service, dataset["id"], recipe="paper")


@pytest.fixture(scope="module")
def default(service: Service, dataset: dict[str, Any]) -> dict[str, Any]:
    return run(service, dataset["id"])  # no recipe: the product's default


def test_the_paper_recipe_reaches_stage_2(paper: dict[str, Any]) -> None:
    queued, job = paper["queued"], paper["job"]
    assert queued["recipe"] == job["recipe"] == "paper"
    # Queued: what was asked ("auto" left to the recipe). Done: what stage 2 used.
    assert queued["hyperparameters"]["prompt_tokens"] == "auto"
    assert queued["hyperparameters"]["pseudo_label_balance"] == "auto"
    hp = job["hyperparameters"]
    assert hp["recipe"] == "paper"
    assert hp["prompt_tokens"] == 50 and hp["pseudo_label_balance"] == "none"
    assert hp["strong_crop_scale"] == [0.2, 1.0] and hp["strong_blur_sigma"] == [0.1, 2.0]
    assert hp["balance_prior_init"] == "first_batch"
    assert hp["epochs"] == 1 and hp["batch_size"] == 4 and hp["total_steps"] == 2


def test_the_default_recipe_resolves_differently_for_a_small_model(
    paper: dict[str, Any], default: dict[str, Any]
) -> None:
    job = default["job"]
    assert default["queued"]["recipe"] == job["recipe"] == "default"
    hp = job["hyperparameters"]
    expected = AdaptConfig(recipe="default").resolve(MIN_IMAGES, 32, TINY_PATCHES, TINY_WIDTH)
    assert hp["recipe"] == "default"
    assert hp["prompt_tokens"] == expected["prompt_tokens"] == TINY_PROMPTS  # not the paper's 50
    assert hp["pseudo_label_balance"] == "align" and hp["balance_prior_init"] == "pool"
    assert hp["strong_crop_scale"] == expected["strong_crop_scale"] != [0.2, 1.0]
    assert hp["strong_blur_sigma"] == expected["strong_blur_sigma"] != [0.1, 2.0]
    # The prompts were really made at those counts: the trainable sets differ by 46 prompt tokens.
    gap = paper["job"]["hyperparameters"]["trainable_parameters"] - hp["trainable_parameters"]
    assert gap == (50 - TINY_PROMPTS) * TINY_WIDTH


def test_an_explicit_value_wins_over_the_recipe(service: Service, dataset: dict[str, Any]) -> None:
    job = run(
        service,
        dataset["id"],
        recipe="paper",
        hyperparameters={**HP, "prompt_tokens": 8, "pseudo_label_balance": "align", "balance_tau": 0.5},
    )["job"]
    hp = job["hyperparameters"]
    assert hp["recipe"] == "paper" and hp["prompt_tokens"] == 8
    assert hp["pseudo_label_balance"] == "align" and hp["balance_tau"] == 0.5
    assert hp["strong_crop_scale"] == [0.2, 1.0]  # what was left "auto" is still the paper's
