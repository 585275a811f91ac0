"""Language-model access for stage 0: OpenAI-compatible chat completions through the ``openai`` package.

Any server that speaks the chat-completions protocol works (OpenAI, vLLM, Ollama, llama.cpp,
LiteLLM, ...). Transient HTTP failures (408, 409, 429, 5xx, timeouts, connection errors) are retried
by the ``openai`` package itself (``LLMConfig.max_retries`` times, exponential backoff with jitter,
``Retry-After`` honoured); the rest (bad request, auth, not found) fail at once, because repeating
them only delays an error the user has to fix. What the package cannot know is retried here: a 200
whose body is not a usable chat completion (not JSON, no choices), with the same number of retries
and an exponential backoff of ``LLMConfig.backoff_s``.

Answers are cleaned to one plain sentence each, since LaFTer feeds them verbatim to CLIP's text
encoder, whose context is short and which was trained on caption-like text rather than chat prose.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import openai
from openai.types.chat import ChatCompletionMessageParam

from lafter.errors import Cancelled, InvalidInputError, LLMError
from lafter.progress import CancelCheck

logger = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Local servers (vLLM, Ollama, llama.cpp) ignore the key, but the openai package refuses to build a
# client without one.
PLACEHOLDER_API_KEY = "sk-no-key-required"

DEFAULT_SYSTEM_PROMPT = "Answer with one short, concrete, visual sentence. No lists, no preamble."

# Longest wait between two attempts after an unusable body.
MAX_BACKOFF_S = 30.0

# OpenAI rejects larger ``n``; ask in chunks instead.
MAX_CHOICES_PER_REQUEST = 128

# How often a waiting complete_many() re-checks its cancellation callback.
_CANCEL_POLL_S = 0.1


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class LLMConfig:
    """Where and how to ask. ``configured`` is False for the default instance so that offline runs
    (no server, no key) fall back to templates instead of failing on a connection error."""

    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 1.0
    max_tokens: int = 50
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    concurrency: int = 8
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.base_url is not None:
            self.base_url = self.base_url.strip().rstrip("/") or None
        problems = []
        if not self.model.strip():
            problems.append("model must not be empty")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2], got {self.temperature}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0:
            problems.append(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if problems:
            raise InvalidInputError("invalid LLM configuration: " + "; ".join(problems))

    @property
    def configured(self) -> bool:
        return bool(self.base_url) or bool(self.api_key)

    @property
    def effective_base_url(self) -> str:
        """The URL actually contacted; made explicit so the openai package never picks one up from
        the environment behind our back (cache keys and error messages must name the real one)."""
        return self.base_url or OPENAI_DEFAULT_BASE_URL

    @property
    def effective_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        return PLACEHOLDER_API_KEY if self.base_url else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig:
        """Read ``LAFTER_LLM_BASE_URL``, ``LAFTER_LLM_MODEL``, ``LAFTER_LLM_API_KEY`` (falling back to
        ``OPENAI_API_KEY``) and ``LAFTER_LLM_TIMEOUT_S``. Empty values count as unset, so a blank line
        in an env file does not switch a deployment to a broken configuration."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        kwargs: dict[str, Any] = {}
        if (base_url := get("LAFTER_LLM_BASE_URL")) is not None:
            kwargs["base_url"] = base_url
        if (model := get("LAFTER_LLM_MODEL")) is not None:
            kwargs["model"] = model
        api_key = get("LAFTER_LLM_API_KEY") or get("OPENAI_API_KEY")
        if api_key is not None:
            kwargs["api_key"] = api_key
        if (timeout := get("LAFTER_LLM_TIMEOUT_S")) is not None:
            try:
                kwargs["timeout_s"] = float(timeout)
            except ValueError:
                raise InvalidInputError(
                    f"LAFTER_LLM_TIMEOUT_S must be a number of seconds, got {timeout!r}"
                ) from None
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# description cache hook


@runtime_checkable
class DescriptionCache(Protocol):
    """Stores cleaned answers by ``cache_key``. Called only from the thread that called
    ``complete_many``, so implementations need not be thread-safe (a DB session is fine)."""

    def get(self, key: str) -> list[str] | None: ...

    def put(self, key: str, answers: list[str]) -> None: ...


class InMemoryDescriptionCache:
    """A dict behind the ``DescriptionCache`` protocol, for tests and single-process runs."""

    def __init__(self) -> None:
        self._data: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> list[str] | None:
        with self._lock:
            value = self._data.get(key)
            return list(value) if value is not None else None

    def put(self, key: str, answers: list[str]) -> None:
        with self._lock:
            self._data[key] = list(answers)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def cache_key(config: LLMConfig, prompt: str, n: int) -> str:
    """SHA-256 over everything the answers depend on, so a changed model, URL, sampling setting or
    system prompt never serves stale answers. The API key is deliberately left out: it changes who
    pays, not what comes back."""
    payload = {
        "v": 1,
        "base_url": config.effective_base_url,
        "model": config.model,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "system_prompt": config.system_prompt,
        "prompt": prompt,
        "n": n,
    }
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# answer cleaning

_QUOTES = "\"'`“”‘’«»„"
_LIST_MARKER = re.compile(r"^(?:[-*•·–—+>#]+|\(?\d{1,3}[.)\]:](?=\s)|\(?[a-zA-Z][.)](?=\s))\s*")
_PREFIX = re.compile(
    r"^(?:a|answer|caption|description|response|output|assistant|image caption)\s*[:：]\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok|absolutely)\b[\s,!.:-]*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]*[:\n]\s*)?",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"\*\*|__|\*")
_SENTENCE_END = re.compile(r"[.!?](?=\s+[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "vs", "etc", "e.g", "i.e", "approx", "no"}
)
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry[,!.]|i apologi[sz]e|i cannot|i can'?t|i can not"
    r"|i'?m unable|i am unable|i'?m not able|i am not able|i do not have|i don'?t have"
    r"|unfortunately,? i|as an ai\b|as a language model)"
    r"|\bas an ai (?:language )?model\b",
    re.IGNORECASE,
)
_WORDISH = re.compile(r"[^\W_]", re.UNICODE)


def _strip_decorations(text: str) -> str:
    """Peel quotes, list markers and ``A:``-style prefixes until nothing changes: models stack them
    (``1. "A: ..."``)."""
    previous = None
    while previous != text:
        previous = text
        text = text.strip()
        text = _LIST_MARKER.sub("", text)
        text = _PREFIX.sub("", text)
        text = text.strip().strip(_QUOTES).strip()
    return text


def _first_sentence(text: str) -> str:
    for match in _SENTENCE_END.finditer(text):
        end = match.start()
        words = text[:end].split()
        last = words[-1].lower().strip(_QUOTES + "(") if words else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue  # "St. Bernard", "e.g. a", "J. Smith": not a sentence end
        return text[: end + 1]
    return text


def clean_answer(text: str | None) -> str | None:
    """One usable sentence from a raw model answer, or None when nothing usable is left.

    Chat models wrap answers in quotes, bullets, "Sure! Here is..." preambles and several
    sentences; CLIP wants one caption-like sentence, and a refusal would teach the classifier that
    "I'm sorry" describes the class.
    """
    if not isinstance(text, str):
        return None
    text = _MARKDOWN.sub("", text).strip()
    text = _PREAMBLE.sub("", text, count=1).strip()
    lines = [line for line in (_strip_decorations(part) for part in text.splitlines()) if line]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)  # a heading such as "Appearance of a tabby cat:" introducing the answer
    if not lines:
        return None
    text = _first_sentence(lines[0])
    text = _strip_decorations(re.sub(r"\s+", " ", text))
    if not _WORDISH.search(text):
        return None
    if _REFUSAL.search(text):
        return None
    return text


def _dedupe_key(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.casefold()).strip().rstrip(".!?;:, ")


# --------------------------------------------------------------------------------------------------
# the client


class _UnusableBody(Exception):
    """A 200 whose body is not a usable chat completion: worth asking again."""


class _Attempts(threading.local):
    """HTTP requests made by the current call in this thread (the ``openai`` package's retries
    included), counted by an httpx event hook so an error can say how often it was tried."""

    count = 0


class LLMClient:
    """Thread-safe: one instance serves every worker thread of ``complete_many``.

    ``sleep`` and ``rng`` (the backoff after an unusable body) are injectable so tests can observe
    that schedule without waiting for it.
    """

    def __init__(
        self,
        config: LLMConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config if config is not None else LLMConfig()
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._rng_lock = threading.Lock()
        self._attempts = _Attempts()
        self._client: openai.OpenAI | None = None
        if self.config.configured:
            self._client = openai.OpenAI(
                base_url=self.config.effective_base_url,
                api_key=self.config.effective_api_key,
                timeout=self.config.timeout_s,
                max_retries=self.config.max_retries,
                http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]}),
            )

    def _count_attempt(self, _request: object) -> None:
        self._attempts.count += 1

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLMClient(url={self.config.effective_base_url!r}, model={self.config.model!r})"

    # -- public ----------------------------------------------------------------------------------
    def complete(self, prompt: str, n: int) -> list[str]:
        """Up to ``n`` distinct cleaned answers to ``prompt``.

        Asks for ``n`` choices in one request; servers that ignore ``n`` (or return junk) are asked
        again for the remainder. Stops early when two rounds in a row add nothing new (a server at
        temperature 0 repeats itself forever), so the result can be shorter than ``n`` but is never
        empty: no usable answer at all raises ``LLMError``.
        """
        if n < 1:
            raise InvalidInputError(f"n must be >= 1, got {n}")
        client = self._require_client()
        answers: list[str] = []
        seen: set[str] = set()
        raw_count = 0
        rounds = 0
        stalled = 0
        max_rounds = 2 * n + 1
        while len(answers) < n and rounds < max_rounds and stalled < 2:
            rounds += 1
            raw = self._request_with_retries(client, prompt, min(n - len(answers), MAX_CHOICES_PER_REQUEST))
            raw_count += len(raw)
            added = 0
            for text in raw:
                cleaned = clean_answer(text)
                if cleaned is None:
                    continue
                key = _dedupe_key(cleaned)
                if key in seen:
                    continue
                seen.add(key)
                answers.append(cleaned)
                added += 1
                if len(answers) == n:
                    break
            stalled = 0 if added else stalled + 1
        if not answers:
            raise LLMError(
                f"{self._where()} returned no usable answer for prompt {prompt!r}: {raw_count} answer(s) in "
                f"{rounds} request(s) were all empty, refusals or unparsable"
            )
        if len(answers) < n:
            logger.info(
                "got %d of %d distinct answers for %r after %d requests", len(answers), n, prompt, rounds
            )
        return answers

    def complete_many(
        self,
        prompts: Sequence[str],
        n: int,
        *,
        cache: DescriptionCache | None = None,
        on_result: Callable[[int, list[str]], None] | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[list[str]]:
        """``complete`` for every prompt, at most ``config.concurrency`` requests in flight.

        Cache look-ups, ``on_result(index, answers)`` and ``should_cancel`` all run in the calling
        thread, as results arrive (not in prompt order). The first failure raises at once and
        abandons queued prompts, because one failed prompt already means the caller cannot use
        the batch (requests already in flight finish in the background and are discarded).
        """
        results: list[list[str] | None] = [None] * len(prompts)
        done = 0

        def deliver(index: int, answers: list[str]) -> None:
            nonlocal done
            results[index] = answers
            done += 1
            if on_result is not None:
                on_result(index, answers)

        def cancel_requested() -> bool:
            return should_cancel is not None and should_cancel()

        if n < 1:
            raise InvalidInputError(f"n must be >= 1, got {n}")
        pending_indices: list[int] = []
        for index, prompt in enumerate(prompts):
            cached = self._cache_get(cache, prompt, n)
            if cached:
                deliver(index, list(cached))
            else:
                pending_indices.append(index)
        if pending_indices:
            self._require_client()
            if cancel_requested():
                raise Cancelled("cancelled before asking the language model", stage="llm", step=done)
            workers = min(self.config.concurrency, len(pending_indices))
            executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lafter-llm")
            try:
                futures: dict[Future[list[str]], int] = {
                    executor.submit(self.complete, prompts[i], n): i for i in pending_indices
                }
                pending: set[Future[list[str]]] = set(futures)
                while pending:
                    finished, pending = wait(pending, timeout=_CANCEL_POLL_S, return_when=FIRST_COMPLETED)
                    for future in finished:
                        index = futures[future]
                        answers = future.result()  # raises the worker's LLMError here
                        self._cache_put(cache, prompts[index], n, answers)
                        deliver(index, answers)
                    if pending and cancel_requested():
                        raise Cancelled(
                            "cancelled while waiting for the language model", stage="llm", step=done
                        )
            finally:
                executor.shutdown(wait=False, cancel_futures=True)
        return [r if r is not None else [] for r in results]

    # -- internals -------------------------------------------------------------------------------
    # A cache only saves money and time: a broken one (database down) must not fail a run that the
    # language model itself can serve, so its errors are logged and otherwise ignored.
    def _cache_get(self, cache: DescriptionCache | None, prompt: str, n: int) -> list[str] | None:
        if cache is None:
            return None
        try:
            return cache.get(cache_key(self.config, prompt, n))
        except Exception:
            logger.warning("description cache lookup failed; asking the language model", exc_info=True)
            return None

    def _cache_put(self, cache: DescriptionCache | None, prompt: str, n: int, answers: list[str]) -> None:
        if cache is None:
            return
        try:
            cache.put(cache_key(self.config, prompt, n), answers)
        except Exception:
            logger.warning("description cache store failed; answers not cached", exc_info=True)

    def _where(self) -> str:
        return f"LLM at {self.config.effective_base_url} (model {self.config.model!r})"

    def _require_client(self) -> openai.OpenAI:
        if self._client is None:
            raise LLMError(
                "no language model configured: set LLMConfig.base_url (an OpenAI-compatible server) "
                "or api_key (or LAFTER_LLM_BASE_URL / LAFTER_LLM_API_KEY)"
            )
        return self._client

    def _backoff(self, attempt: int) -> float:
        """Equal-jitter exponential backoff: the delay for attempt k lies in [b*2^k/2, b*2^k], so
        concurrent workers asking the same server spread out but never retry at once."""
        base = self.config.backoff_s * (2**attempt)
        with self._rng_lock:
            delay = base / 2 + self._rng.uniform(0.0, base / 2)
        return min(delay, MAX_BACKOFF_S)

    def _request_with_retries(self, client: openai.OpenAI, prompt: str, n: int) -> list[str | None]:
        """One request (the ``openai`` package retries transient HTTP failures), asked again up to
        ``max_retries`` times while the answer is a 200 with an unusable body."""
        attempts = self.config.max_retries + 1
        self._attempts.count = 0
        for attempt in range(attempts):
            try:
                return self._request_once(client, prompt, n)
            except _UnusableBody as failure:
                if attempt == attempts - 1:
                    raise self._failed(prompt, str(failure)) from failure
                delay = self._backoff(attempt)
                logger.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                    self._where(),
                    attempt + 1,
                    attempts,
                    failure,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, prompt: str, why: str) -> LLMError:
        tried = max(1, self._attempts.count)
        return LLMError(f"{self._where()} failed after {tried} attempt(s) for prompt {prompt!r}: {why}")

    def _request_once(self, client: openai.OpenAI, prompt: str, n: int) -> list[str | None]:
        messages: list[ChatCompletionMessageParam] = []
        if self.config.system_prompt:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": prompt})
        try:
            response: Any = client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                n=n,
            )
        except openai.APITimeoutError:
            raise self._failed(prompt, f"timed out after {self.config.timeout_s:g}s") from None
        except openai.APIConnectionError as exc:
            raise self._failed(prompt, f"connection error: {exc}") from exc
        except openai.APIStatusError as exc:
            detail = exc.message if len(exc.message) <= 300 else exc.message[:300] + "..."
            raise self._failed(prompt, f"HTTP {exc.status_code}: {detail}") from exc
        except ValueError as exc:  # a 200 whose body claims JSON but does not parse
            raise _UnusableBody(f"response is not valid JSON ({exc})") from exc
        except openai.OpenAIError as exc:
            raise self._failed(prompt, f"{type(exc).__name__}: {exc}") from exc
        return self._extract_contents(response)

    @staticmethod
    def _extract_contents(response: Any) -> list[str | None]:
        """Choices' text, tolerating the partial objects the openai package builds from odd bodies;
        a body with no choices at all is treated as a (retryable) protocol error."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            shown = repr(response)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise _UnusableBody(f"response is not a chat completion (no choices): {shown}")
        contents: list[str | None] = []
        for choice in choices:
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None)
            contents.append(content if isinstance(content, str) else None)
        return contents
