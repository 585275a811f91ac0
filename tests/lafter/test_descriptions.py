"""Stage 0: templates, questions, sources, fallbacks, validation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lafter.descriptions import (
    CIFAR_TEMPLATES,
    DOMAIN_QUESTIONS,
    DOMAIN_TEMPLATES,
    IMAGENET_TEMPLATES,
    QUESTIONS,
    DescriptionConfig,
    Descriptions,
    fill,
    generate_descriptions,
    question_prompts,
    template_sentences,
    templates_for,
)
from lafter.errors import Cancelled, DescriptionError, InvalidInputError, LLMError
from lafter.llm import InMemoryDescriptionCache, LLMClient, LLMConfig
from lafter.progress import ProgressEvent
from tests.lafter.fake_llm import FakeLLMServer, RecordingSleep, answers, fixed, status

ClientFactory = Callable[..., LLMClient]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture
def make_client(server: FakeLLMServer) -> Iterator[ClientFactory]:
    clients: list[LLMClient] = []

    def factory(**overrides: Any) -> LLMClient:
        settings: dict[str, Any] = {"base_url": server.base_url, "model": "fake-model", "backoff_s": 0.0}
        settings.update(overrides)
        client = LLMClient(LLMConfig(**settings), sleep=RecordingSleep())
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


# -- reference text -----------------------------------------------------------------------------


def test_reference_questions_and_templates_are_verbatim() -> None:
    assert QUESTIONS == (
        "Describe what a {} looks like",
        "How can you identify a {}?",
        "What does a {} look like?",
        "Describe an image from the internet of a {}",
        "A caption of an image of a {}:",
    )
    assert set(IMAGENET_TEMPLATES) == {
        "a photo of a {}.",
        "a bad photo of the {}.",
        "a {} in a video game.",
        "a origami {}.",
        "a photo of the small {}.",
        "art of the {}.",
        "a photo of the large {}.",
        "itap of a {}.",
    }
    assert len(IMAGENET_TEMPLATES) == 8
    assert len(CIFAR_TEMPLATES) == 18 == len(set(CIFAR_TEMPLATES))
    for adjective in ("", "blurry ", "black and white ", "low contrast ", "high contrast ", "bad ", "good "):
        for article in ("a", "the"):
            assert f"a {adjective}photo of {article} {{}}." in CIFAR_TEMPLATES
    for size in ("small", "big"):
        assert f"a photo of a {size} {{}}." in CIFAR_TEMPLATES
        assert f"a photo of the {size} {{}}." in CIFAR_TEMPLATES
    assert len(DOMAIN_QUESTIONS) == len(QUESTIONS)
    assert "a {domain} of a {}." in DOMAIN_TEMPLATES


def test_articles_and_underscores() -> None:
    imagenet = template_sentences("apple_pie")
    assert "a photo of an apple pie." in imagenet
    assert "an apple pie in a video game." in imagenet
    assert "a origami apple pie." in imagenet  # the reference's own article, kept
    assert "itap of an apple pie." in imagenet
    assert "a photo of the small apple pie." in imagenet
    assert "a photo of a tench." in template_sentences("tench")
    assert not any("_" in s for s in imagenet)

    assert question_prompts("ice_cream") == [
        "Describe what an ice cream looks like",
        "How can you identify an ice cream?",
        "What does an ice cream look like?",
        "Describe an image from the internet of an ice cream",
        "A caption of an image of an ice cream:",
    ]
    assert question_prompts("great  white_shark")[1] == "How can you identify a great white shark?"
    assert fill("A {} at night.", "owl") == "An owl at night."


def test_domain_variants_choose_articles_for_the_domain_too() -> None:
    prompts = question_prompts("owl", domain="illustration")
    assert prompts[0] == "Describe what an illustration of an owl looks like"
    assert all("illustration" in p for p in prompts)
    sketches = template_sentences("cat", domain="pencil sketch")
    assert "a pencil sketch of a cat." in sketches
    assert "a photo of a cat." not in sketches
    assert templates_for("cifar", domain="sketch") == DOMAIN_TEMPLATES


# -- templates / auto ---------------------------------------------------------------------------


def test_templates_source() -> None:
    result = generate_descriptions(["cat", "dog", "eagle"], DescriptionConfig(source="templates"))
    assert result.source_used == "templates"
    assert result.warnings == []
    assert result.class_names == ["cat", "dog", "eagle"]
    assert len(result.sentences) == len(result.labels) == 3 * 8
    grouped = result.by_class()
    assert grouped["eagle"] == template_sentences("eagle")
    assert all(
        result.class_names[label] in sentence
        for sentence, label in zip(result.sentences, result.labels, strict=True)
    )


@pytest.mark.parametrize(("template_set", "per_class"), [("imagenet", 8), ("cifar", 18), ("all", 23)])
def test_template_sets(template_set: Any, per_class: int) -> None:
    result = generate_descriptions(
        ["cat", "dog"], DescriptionConfig(source="templates", template_set=template_set)
    )
    assert [len(v) for v in result.by_class().values()] == [per_class, per_class]


def test_auto_without_llm_uses_templates_and_says_so() -> None:
    result = generate_descriptions(["cat", "dog"], llm=LLMClient(LLMConfig()))
    assert result.source_used == "templates"
    assert len(result.sentences) == 16
    assert any("no language model configured" in w for w in result.warnings)


def test_llm_source_needs_a_configured_client() -> None:
    for llm in (None, LLMClient(LLMConfig())):
        with pytest.raises(DescriptionError, match="needs a configured language model") as info:
            generate_descriptions(["cat", "dog"], DescriptionConfig(source="llm"), llm=llm)
        assert not isinstance(info.value, LLMError)


# -- language model -----------------------------------------------------------------------------


def test_llm_answers_plus_templates(server: FakeLLMServer, make_client: ClientFactory) -> None:
    result = generate_descriptions(
        ["cat", "ice_cream"], DescriptionConfig(source="llm", per_class=2), llm=make_client()
    )

    assert result.source_used == "llm"
    assert result.warnings == []
    expected_prompts = question_prompts("cat") + question_prompts("ice_cream")
    assert sorted(p or "" for p in server.prompts) == sorted(expected_prompts)
    assert all(r.n == 2 for r in server.requests)
    grouped = result.by_class()
    for name in ("cat", "ice_cream"):
        llm_part = [s for s in grouped[name] if s.startswith("Answer")]
        assert len(llm_part) == 5 * 2
        assert all(question_prompts(name)[0].rstrip() in s or "Answer" in s for s in llm_part)
        assert grouped[name][len(llm_part) :] == template_sentences(name)
    # every LLM sentence carries the label of the class it was asked about
    for sentence, label in zip(result.sentences, result.labels, strict=True):
        if sentence.startswith("Answer"):
            assert ("an ice cream" in sentence) == (result.class_names[label] == "ice_cream")


def test_auto_with_configured_llm_uses_it(server: FakeLLMServer, make_client: ClientFactory) -> None:
    result = generate_descriptions(["cat", "dog"], DescriptionConfig(per_class=1), llm=make_client())
    assert result.source_used == "llm"
    assert server.count() == 10


def test_domain_prompts_reach_the_model(server: FakeLLMServer, make_client: ClientFactory) -> None:
    result = generate_descriptions(
        ["cat", "dog"], DescriptionConfig(source="llm", per_class=1, domain="sketch"), llm=make_client()
    )
    assert "Describe what a sketch of a cat looks like" in server.prompts
    assert all(p is not None and "sketch" in p for p in server.prompts)
    assert "a sketch of a dog." in result.by_class()["dog"]
    assert "a photo of a dog." not in result.by_class()["dog"]


def test_llm_failure_falls_back_to_templates_with_warning(
    server: FakeLLMServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server.default = status(500)
    with caplog.at_level(logging.WARNING, logger="lafter.descriptions"):
        result = generate_descriptions(
            ["cat", "dog"], DescriptionConfig(source="llm"), llm=make_client(max_retries=1)
        )

    assert result.source_used == "templates"
    assert result.sentences == template_sentences("cat") + template_sentences("dog")
    assert len(result.warnings) == 1
    assert "fell back to templates" in result.warnings[0] and "HTTP 500" in result.warnings[0]
    assert any("fell back to templates" in r.getMessage() for r in caplog.records)


def test_llm_failure_can_be_fatal(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = status(500)
    with pytest.raises(LLMError, match="HTTP 500"):
        generate_descriptions(
            ["cat", "dog"],
            DescriptionConfig(source="llm", on_llm_failure="fail"),
            llm=make_client(max_retries=0),
        )


def test_repetitive_model_is_flagged(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = fixed(["A furry animal."])
    result = generate_descriptions(
        ["cat", "dog"], DescriptionConfig(source="llm", per_class=4), llm=make_client()
    )
    assert result.source_used == "llm"
    assert result.by_class()["cat"].count("A furry animal.") == 1  # deduplicated across questions
    assert any("fewer than half" in w for w in result.warnings)


def test_cache_makes_the_second_run_free(server: FakeLLMServer, make_client: ClientFactory) -> None:
    cache = InMemoryDescriptionCache()
    config = DescriptionConfig(source="llm", per_class=3)
    first = generate_descriptions(["cat", "dog"], config, llm=make_client(), cache=cache)
    asked = server.count()
    assert asked == 10

    second = generate_descriptions(["cat", "dog"], config, llm=make_client(), cache=cache)
    assert server.count() == asked
    assert second.sentences == first.sentences and second.labels == first.labels


def test_progress_and_cancellation_with_llm(server: FakeLLMServer, make_client: ClientFactory) -> None:
    events: list[ProgressEvent] = []
    result = generate_descriptions(
        ["cat", "dog", "owl"],
        DescriptionConfig(source="llm", per_class=1),
        llm=make_client(),
        progress=events.append,
    )
    assert {e.stage for e in events} == {"describing"}
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.total == 3 for e in events)
    assert events[-1].metrics["sentences"] == len(result.sentences)

    server.reset()
    server.default = answers(delay_s=0.05)
    seen: list[ProgressEvent] = []
    names = [f"class {i}" for i in range(10)]
    with pytest.raises(Cancelled) as info:
        generate_descriptions(
            names,
            DescriptionConfig(source="llm", per_class=1),
            llm=make_client(concurrency=1),
            progress=seen.append,
            should_cancel=lambda: bool(seen),
        )
    assert info.value.stage == "describing"
    assert info.value.step == 1
    assert server.count() < 5 * len(names)


# -- provided -----------------------------------------------------------------------------------


def test_provided_sentences_plus_templates() -> None:
    provided = {
        "cat": ["A small feline.", "  a  small feline. ", "a photo of a cat."],
        "Sea_Lion": ["A marine mammal on a rock."],
    }
    result = generate_descriptions(
        ["cat", "sea lion"], DescriptionConfig(source="provided", provided=provided)
    )
    assert result.source_used == "provided"
    grouped = result.by_class()
    assert grouped["cat"][0] == "A small feline."
    assert grouped["cat"].count("a photo of a cat.") == 1  # the provided copy and the template merged
    assert len(grouped["cat"]) == 1 + 8
    assert grouped["sea lion"][0] == "A marine mammal on a rock."


def test_provided_rejects_unknown_and_missing_classes() -> None:
    with pytest.raises(InvalidInputError, match="unknown classes: 'zebra'"):
        generate_descriptions(
            ["cat", "dog"],
            DescriptionConfig(source="provided", provided={"cat": ["x"], "dog": ["y"], "zebra": ["z"]}),
        )
    with pytest.raises(InvalidInputError, match="missing for: 'dog'"):
        generate_descriptions(
            ["cat", "dog"], DescriptionConfig(source="provided", provided={"cat": ["x"], "dog": ["  ", ""]})
        )


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cat"], "at least 2"),
        ([], "at least 2"),
        (["cat", "  "], "must not be empty"),
        (["cat", "Cat "], "unique"),
        (["sea_lion", "sea lion"], "unique"),
        ("cat", "list of names"),
    ],
)
def test_class_name_validation(names: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        generate_descriptions(names, DescriptionConfig(source="templates"))


def test_class_names_are_trimmed() -> None:
    assert generate_descriptions([" cat ", "dog"], DescriptionConfig(source="templates")).class_names == [
        "cat",
        "dog",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source": "gpt"},
        {"per_class": 0},
        {"template_set": "coco"},
        {"on_llm_failure": "ignore"},
        {"domain": "  "},
        {"source": "provided"},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        DescriptionConfig(**kwargs)


def test_cancel_before_anything() -> None:
    with pytest.raises(Cancelled) as info:
        generate_descriptions(
            ["cat", "dog"], DescriptionConfig(source="templates"), should_cancel=lambda: True
        )
    assert info.value.stage == "describing"


# -- serialisation ------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    original = generate_descriptions(["cat", "dog"], DescriptionConfig(source="templates", domain="cartoon"))
    original.warnings.append("note")
    restored = Descriptions.from_json(original.to_json())
    assert restored == original
    with pytest.raises(InvalidInputError):
        Descriptions.from_json("{not json")
    with pytest.raises(InvalidInputError):
        Descriptions.from_json(
            '{"sentences": ["a"], "labels": [5], "class_names": ["x", "y"], "source_used": "t"}'
        )
    with pytest.raises(InvalidInputError):
        Descriptions(["a", "b"], [0], ["x", "y"], "templates")


def test_provided_sentences_with_another_source_are_ignored_with_a_warning() -> None:
    config = DescriptionConfig(source="templates", provided={"cat": ["A very particular cat."]})
    result = generate_descriptions(["cat", "dog"], config)
    assert "A very particular cat." not in result.sentences
    assert any("provided sentences were ignored" in w for w in result.warnings)
