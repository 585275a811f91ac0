"""A reader of the Server-Sent Events wire format (the WHATWG ``text/event-stream`` rules: ``field:
value`` lines, a blank line ends a message, ``:`` starts a comment)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None  # set (and nothing else) for a comment line: a heartbeat

    def json(self) -> Any:
        return json.loads(self.data)


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Messages and comments from the stream's lines, in order. A message without ``data`` is
    dropped, as a browser drops it."""
    event, event_id, retry = "", None, None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), event_id, retry)
            event, retry = "", None
            data = []
            continue
        if line.startswith(":"):
            yield ServerSentEvent(event="", comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\x00" not in value:
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
