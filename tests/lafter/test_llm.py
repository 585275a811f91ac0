"""LLMClient against a real HTTP server that fakes an OpenAI-compatible model."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lafter.errors import Cancelled, InvalidInputError, LLMError
from lafter.llm import (
    PLACEHOLDER_API_KEY,
    DescriptionCache,
    InMemoryDescriptionCache,
    LLMClient,
    LLMConfig,
    cache_key,
    clean_answer,
)
from tests.lafter.fake_llm import (
    FakeLLMServer,
    FakeResponse,
    RecordedRequest,
    RecordingSleep,
    answers,
    completion_body,
    fixed,
    hang,
    malformed_json,
    status,
    wrong_shape,
)

ClientFactory = Callable[..., LLMClient]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture
def sleeper() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def make_client(server: FakeLLMServer, sleeper: RecordingSleep) -> Iterator[ClientFactory]:
    """Clients pointed at the fake server; backoff is recorded, not slept, unless a test asks."""
    clients: list[LLMClient] = []

    def factory(*, real_sleep: bool = False, **overrides: Any) -> LLMClient:
        settings: dict[str, Any] = {"base_url": server.base_url, "model": "fake-model", "backoff_s": 0.1}
        settings.update(overrides)
        client = LLMClient(LLMConfig(**settings), sleep=time.sleep if real_sleep else sleeper)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


# -- cleaning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A small dog with floppy ears.", "A small dog with floppy ears."),
        ('  "A dog with floppy ears."  ', "A dog with floppy ears."),
        ("“A curly-tailed pig.”", "A curly-tailed pig."),
        ("1. A cat. It has whiskers and fur.", "A cat."),
        ("- A red fox with a bushy tail", "A red fox with a bushy tail"),
        ("* **A red fox** in the snow.", "A red fox in the snow."),
        ("A: a tabby cat sitting on a mat.", "a tabby cat sitting on a mat."),
        ("Caption: 'a plane in a blue sky'", "a plane in a blue sky"),
        ("Sure! Here is a description:\n\nA heron standing in water.", "A heron standing in water."),
        ("Appearance of a tabby:\nStriped grey fur and green eyes.", "Striped grey fur and green eyes."),
        ("A   wide \t river\nsecond line", "A wide river"),
        ("A St. Bernard is a huge dog. It drools.", "A St. Bernard is a huge dog."),
        ("3.5 inch floppy disks are square.", "3.5 inch floppy disks are square."),
        ("", None),
        ("   \n  ", None),
        ("...", None),
        ('""', None),
        ("I'm sorry, but I can't describe that.", None),
        ("As an AI language model, I cannot see images.", None),
        ("I cannot help with that request.", None),
        ("Sure.", None),
        (None, None),
    ],
)
def test_clean_answer(raw: str | None, expected: str | None) -> None:
    assert clean_answer(raw) == expected


# -- config -----------------------------------------------------------------------------------------


def test_config_configured_and_placeholder_key() -> None:
    assert not LLMConfig().configured
    assert LLMConfig(api_key="sk-real").configured
    local = LLMConfig(base_url="http://127.0.0.1:8000/v1/")
    assert local.configured
    assert local.base_url == "http://127.0.0.1:8000/v1"
    assert local.effective_api_key == PLACEHOLDER_API_KEY
    assert LLMConfig(api_key="sk-real").effective_base_url == "https://api.openai.com/v1"
    assert "sk-secret" not in repr(LLMConfig(api_key="sk-secret"))


def test_config_from_env() -> None:
    config = LLMConfig.from_env(
        {
            "LAFTER_LLM_BASE_URL": "http://llm:8000/v1",
            "LAFTER_LLM_MODEL": "qwen",
            "OPENAI_API_KEY": "sk-fallback",
            "LAFTER_LLM_TIMEOUT_S": "12.5",
        }
    )
    assert (config.base_url, config.model, config.api_key, config.timeout_s) == (
        "http://llm:8000/v1",
        "qwen",
        "sk-fallback",
        12.5,
    )
    assert LLMConfig.from_env({"LAFTER_LLM_API_KEY": "sk-a", "OPENAI_API_KEY": "sk-b"}).api_key == "sk-a"
    blank = LLMConfig.from_env({"LAFTER_LLM_BASE_URL": "  ", "LAFTER_LLM_MODEL": ""})
    assert not blank.configured and blank.model == "gpt-4o-mini"
    with pytest.raises(InvalidInputError, match="LAFTER_LLM_TIMEOUT_S"):
        LLMConfig.from_env({"LAFTER_LLM_TIMEOUT_S": "soon"})


@pytest.mark.parametrize(
    "bad",
    [{"max_retries": -1}, {"concurrency": 0}, {"timeout_s": 0}, {"max_tokens": 0}, {"temperature": 3.0}],
)
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        LLMConfig(base_url="http://x/v1", **bad)


def test_unconfigured_client_raises_llm_error() -> None:
    client = LLMClient(LLMConfig())
    with pytest.raises(LLMError, match="no language model configured"):
        client.complete("Describe a cat", 2)


# -- normal answers ---------------------------------------------------------------------------------


def test_complete_returns_n_answers_and_sends_settings(
    server: FakeLLMServer, make_client: ClientFactory
) -> None:
    client = make_client(temperature=0.7, max_tokens=33)
    result = client.complete("What does a cat look like?", 3)

    assert result == [
        "Answer 0 to What does a cat look like.",
        "Answer 1 to What does a cat look like.",
        "Answer 2 to What does a cat look like.",
    ]
    assert server.count() == 1  # the server honoured n: one request is enough
    body = server.requests[0].body
    assert body is not None
    assert body["model"] == "fake-model"
    assert body["temperature"] == 0.7
    assert body["max_tokens"] == 33
    assert body["n"] == 3
    assert body["messages"][-1] == {"role": "user", "content": "What does a cat look like?"}
    assert server.requests[0].headers["authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"


def test_complete_cleans_and_dedupes(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = fixed(['"A cat."', "a cat", "1. A dog. With a tail.", "I'm sorry, I can't.", None, "  "])
    result = make_client().complete("Describe a cat", 3)

    assert result == ["A cat.", "A dog."]
    # Asked for the missing one again, got nothing new twice, and gave up instead of looping.
    assert server.count() == 3
    assert [r.n for r in server.requests] == [3, 1, 1]


def test_complete_tops_up_when_server_ignores_n(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = answers(honour_n=False)
    result = make_client().complete("How can you identify a cat?", 4)

    assert len(result) == 4 and len(set(result)) == 4
    assert [r.n for r in server.requests] == [4, 3, 2, 1]


def test_all_junk_raises(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = fixed(["", "I'm sorry, but I cannot help with that.", None])
    with pytest.raises(LLMError, match="no usable answer") as info:
        make_client().complete("Describe a cat", 5)
    assert "fake-model" in str(info.value) and server.base_url in str(info.value)
    assert server.count() == 2  # two fruitless rounds, not 2n+1


# -- retries ----------------------------------------------------------------------------------------


def _gaps(server: FakeLLMServer) -> list[float]:
    """Seconds between consecutive requests the server received."""
    times = [r.at for r in server.requests]
    return [b - a for a, b in itertools.pairwise(times)]


def test_server_errors_are_retried_with_growing_backoff(
    server: FakeLLMServer, make_client: ClientFactory, sleeper: RecordingSleep
) -> None:
    """The openai package retries 5xx with exponential backoff (0.5 s, then 1 s, less up to 25%
    jitter); only lower bounds are asserted, which a busy machine cannot break."""
    server.push(status(500), status(503))
    result = make_client(max_retries=3).complete("Describe a cat", 2)

    assert len(result) == 2
    assert server.count() == 3
    first, second = _gaps(server)
    assert first >= 0.5 * 0.75 and second >= 1.0 * 0.75  # the second wait is the doubled one
    assert sleeper.delays == []  # our own backoff is only for unusable bodies


def test_permanent_500_gives_up_after_max_retries(
    server: FakeLLMServer, make_client: ClientFactory, sleeper: RecordingSleep
) -> None:
    server.default = status(500)
    with pytest.raises(LLMError) as info:
        make_client(max_retries=2).complete("Describe a cat", 2)

    assert server.count() == 3
    message = str(info.value)
    assert "after 3 attempt(s)" in message
    assert "HTTP 500" in message
    assert server.base_url in message and "fake-model" in message
    assert info.value.code == "llm_failed"


@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_client_errors_are_not_retried(server: FakeLLMServer, make_client: ClientFactory, code: int) -> None:
    server.default = status(code)
    with pytest.raises(LLMError, match=f"after 1 attempt\\(s\\).*HTTP {code}"):
        make_client(max_retries=3).complete("Describe a cat", 2)
    assert server.count() == 1


def test_rate_limit_is_retried_and_retry_after_honoured(
    server: FakeLLMServer, make_client: ClientFactory
) -> None:
    server.push(status(429, headers={"Retry-After": "1.5"}))  # longer than the 0.5 s backoff
    assert make_client().complete("Describe a cat", 1)
    assert server.count() == 2
    assert _gaps(server)[0] >= 1.5


def test_timeout_is_retried_then_fails(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = hang(3.0)
    started = time.monotonic()
    with pytest.raises(LLMError, match="timed out") as info:
        make_client(timeout_s=0.3, max_retries=1).complete("Describe a cat", 1)
    elapsed = time.monotonic() - started

    assert "after 2 attempt(s)" in str(info.value)
    assert server.count() == 2
    assert elapsed < 6.0  # gave up on the client side, did not wait twice for the slow server


def test_timeout_then_success(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.push(hang(3.0))
    assert len(make_client(timeout_s=0.3).complete("Describe a cat", 2)) == 2
    assert server.count() == 2


def test_connection_refused_is_an_llm_error(make_client: ClientFactory) -> None:
    client = make_client(base_url="http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(LLMError, match="connection error"):
        client.complete("Describe a cat", 1)


def test_malformed_json_is_retried_then_fails(
    server: FakeLLMServer, make_client: ClientFactory, sleeper: RecordingSleep
) -> None:
    server.default = malformed_json()
    with pytest.raises(LLMError, match=r"after 3 attempt\(s\).*not valid JSON"):
        make_client(max_retries=2, backoff_s=0.1).complete("Describe a cat", 1)
    assert server.count() == 3
    first, second = sleeper.delays  # equal jitter: [b/2, b], then doubled
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2


def test_malformed_json_once_then_success(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.push(malformed_json())
    assert len(make_client().complete("Describe a cat", 2)) == 2


def test_body_that_is_not_a_completion(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = wrong_shape()
    with pytest.raises(LLMError, match="no choices"):
        make_client(max_retries=0).complete("Describe a cat", 1)


# -- many prompts -----------------------------------------------------------------------------------


def test_complete_many_honours_concurrency_and_keeps_order(
    server: FakeLLMServer, make_client: ClientFactory
) -> None:
    server.default = answers(delay_s=0.15)
    prompts = [f"Describe thing {i}" for i in range(9)]
    results = make_client(concurrency=3).complete_many(prompts, 2)

    assert server.max_in_flight == 3  # parallel, but never more than asked
    assert len(results) == 9
    for prompt, result in zip(prompts, results, strict=True):
        assert len(result) == 2
        assert all(prompt in answer for answer in result)


def test_complete_many_fails_when_one_prompt_fails(server: FakeLLMServer, make_client: ClientFactory) -> None:
    good = answers()

    def picky(request: RecordedRequest) -> FakeResponse:
        if request.prompt == "Describe thing 2":
            return FakeResponse(status=400, body=completion_body(request, []))
        return good(request)

    server.default = picky
    with pytest.raises(LLMError, match="thing 2"):
        make_client(concurrency=2).complete_many([f"Describe thing {i}" for i in range(5)], 1)


def test_complete_many_cancellation(server: FakeLLMServer, make_client: ClientFactory) -> None:
    server.default = answers(delay_s=0.1)
    results: list[int] = []
    flag = threading.Event()

    def on_result(index: int, _answers: list[str]) -> None:
        results.append(index)
        flag.set()

    with pytest.raises(Cancelled):
        make_client(concurrency=1).complete_many(
            [f"Describe thing {i}" for i in range(20)], 1, on_result=on_result, should_cancel=flag.is_set
        )
    time.sleep(0.3)  # let the one in-flight request land before counting
    assert 1 <= len(results) <= 2
    assert server.count() <= 4  # the queued prompts were abandoned


# -- cache ------------------------------------------------------------------------------------------


def test_cache_key_covers_everything_the_answer_depends_on() -> None:
    base = LLMConfig(base_url="http://a/v1", model="m", temperature=1.0, max_tokens=50)
    key = cache_key(base, "Describe a cat", 10)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == cache_key(
        LLMConfig(base_url="http://a/v1", model="m", api_key="other"), "Describe a cat", 10
    )
    variants = [
        cache_key(LLMConfig(base_url="http://b/v1", model="m"), "Describe a cat", 10),
        cache_key(LLMConfig(base_url="http://a/v1", model="m2"), "Describe a cat", 10),
        cache_key(LLMConfig(base_url="http://a/v1", model="m", temperature=0.5), "Describe a cat", 10),
        cache_key(LLMConfig(base_url="http://a/v1", model="m", max_tokens=20), "Describe a cat", 10),
        cache_key(base, "Describe a dog", 10),
        cache_key(base, "Describe a cat", 9),
    ]
    assert len({key, *variants}) == len(variants) + 1


def test_cache_hit_sends_no_request(server: FakeLLMServer, make_client: ClientFactory) -> None:
    cache = InMemoryDescriptionCache()
    assert isinstance(cache, DescriptionCache)
    client = make_client()
    prompts = ["Describe a cat", "Describe a dog"]

    first = client.complete_many(prompts, 3, cache=cache)
    assert server.count() == 2
    assert len(cache) == 2

    second = client.complete_many(prompts, 3, cache=cache)
    assert second == first
    assert server.count() == 2  # nothing new asked

    client.complete_many(prompts, 4, cache=cache)  # different n: a different question
    assert server.count() == 4


class BrokenCache:
    def get(self, key: str) -> list[str] | None:
        raise RuntimeError("database is down")

    def put(self, key: str, answers: list[str]) -> None:
        raise RuntimeError("database is down")


def test_broken_cache_does_not_fail_the_run(server: FakeLLMServer, make_client: ClientFactory) -> None:
    results = make_client().complete_many(["Describe a cat", "Describe a dog"], 2, cache=BrokenCache())
    assert [len(r) for r in results] == [2, 2]
    assert server.count() == 2
