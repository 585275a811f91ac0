"""A scriptable OpenAI-compatible chat-completions server for tests.

It speaks real HTTP on 127.0.0.1 so the production client (the ``openai`` package) is exercised
end to end: request encoding, status handling, timeouts and response parsing are all the real
thing, only the model is fake. Each request is answered by the next scripted behaviour, or by the
default behaviour once the script runs out, and is recorded so tests can count attempts and check
what was sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class RecordedRequest:
    """What the client sent; ``body`` is None when it was not JSON."""

    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def prompt(self) -> str | None:
        """The last user message, i.e. the question the client asked."""
        if not self.body:
            return None
        for message in reversed(self.body.get("messages", [])):
            if message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else None
        return None

    @property
    def n(self) -> int:
        if not self.body:
            return 1
        value = self.body.get("n")
        return int(value) if value is not None else 1


@dataclass(frozen=True)
class FakeResponse:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay_s: float = 0.0


Behaviour = Callable[[RecordedRequest], FakeResponse]


def completion_body(request: RecordedRequest, contents: Sequence[str | None]) -> bytes:
    """An OpenAI chat-completion JSON body with one choice per content."""
    model = (request.body or {}).get("model", "fake-model")
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
            for i, content in enumerate(contents)
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return json.dumps(payload).encode()


def default_answer(prompt: str, index: int) -> str:
    """A distinct, clean one-sentence answer so dedupe does not collapse them."""
    return f"Answer {index} to {prompt.rstrip(':?.')}."


def answers(
    make: Callable[[str, int], str] = default_answer,
    *,
    honour_n: bool = True,
    delay_s: float = 0.0,
) -> Behaviour:
    """Normal answers: ``n`` choices (or one when ``honour_n`` is False, like servers that ignore n).

    ``make(prompt, index)`` builds each answer; ``index`` counts across the whole server lifetime so
    answers stay distinct across repeated requests for the same prompt.
    """
    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def behaviour(request: RecordedRequest) -> FakeResponse:
        count = request.n if honour_n else 1
        with lock:
            indices = [next(counter) for _ in range(count)]
        prompt = request.prompt or ""
        return FakeResponse(
            body=completion_body(request, [make(prompt, i) for i in indices]), delay_s=delay_s
        )

    return behaviour


def fixed(contents: Sequence[str | None], *, delay_s: float = 0.0) -> Behaviour:
    """Exactly these choices whatever ``n`` asked for (junk, duplicates, refusals, None)."""

    def behaviour(request: RecordedRequest) -> FakeResponse:
        return FakeResponse(body=completion_body(request, contents), delay_s=delay_s)

    return behaviour


def status(code: int, *, headers: dict[str, str] | None = None) -> Behaviour:
    """An OpenAI-style error body with the given HTTP status."""
    body = json.dumps({"error": {"message": f"fake error {code}", "type": "fake", "code": None}}).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}

    def behaviour(_request: RecordedRequest) -> FakeResponse:
        return FakeResponse(status=code, body=body, headers=all_headers)

    return behaviour


def hang(seconds: float) -> Behaviour:
    """Answer only after ``seconds`` (longer than the client's timeout in timeout tests)."""
    inner = answers()

    def behaviour(request: RecordedRequest) -> FakeResponse:
        response = inner(request)
        return FakeResponse(status=response.status, body=response.body, delay_s=seconds)

    return behaviour


def malformed_json() -> Behaviour:
    """HTTP 200 claiming JSON but sending something that does not parse."""

    def behaviour(_request: RecordedRequest) -> FakeResponse:
        return FakeResponse(body=b'{"choices": [ {"message": ')

    return behaviour


def wrong_shape() -> Behaviour:
    """Valid JSON that is not a chat completion at all."""

    def behaviour(_request: RecordedRequest) -> FakeResponse:
        return FakeResponse(body=b'{"hello": "world"}')

    return behaviour


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # hanging handlers must not block stop()
    # The stdlib default backlog of 5 overflows when a client opens 8 connections at once, and the
    # kernel then retries the connection a whole second later: tests became slow for no reason.
    request_queue_size = 128


class FakeLLMServer:
    """The server. Use as a context manager or call ``start()``/``stop()``."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default or answers()
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ---------------------------------------------------------------------------
    def push(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order (whichever request arrives first)."""
        with self._lock:
            self._script.extend(behaviours)

    def push_many(self, behaviour: Behaviour, times: int) -> None:
        self.push(*([behaviour] * times))

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def prompts(self) -> list[str | None]:
        with self._lock:
            return [r.prompt for r in self.requests]

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeLLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                request = RecordedRequest(
                    path=self.path,
                    body=parsed if isinstance(parsed, dict) else None,
                    headers={k.lower(): v for k, v in self.headers.items()},
                )
                response = server._enter(request)
                try:
                    if response.delay_s > 0 and server._stopping.wait(response.delay_s):
                        return
                    self.send_response(response.status)
                    for key, value in response.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(response.body)))
                    self.end_headers()
                    self.wfile.write(response.body)
                except OSError:
                    pass  # the client gave up (timeout) and closed the socket
                finally:
                    server._leave()

        httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------
    def _enter(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            behaviour = self._script.popleft() if self._script else self.default
        return behaviour(request)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def prompts_of(requests: Iterable[RecordedRequest]) -> list[str | None]:
    return [r.prompt for r in requests]


class RecordingSleep:
    """Stands in for ``time.sleep`` in the client so backoff delays are observed, not waited for."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.delays.append(seconds)
