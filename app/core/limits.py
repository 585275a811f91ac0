"""Request body limit that answers 413 problem JSON instead of dropping the connection.

When the limit is crossed mid-upload the rest of the body (up to ``drain_bytes``) is read and
thrown away before the answer goes out: a client still sending would otherwise see a reset
connection instead of our 413. Nothing of the body is kept in memory: drained chunks are dropped.

A client that declared a too-large ``Content-Length`` and asked ``Expect: 100-continue`` (curl does
for any body over 1 MB) is answered at once, before it sends a byte: reading the body would make the
server send ``100 Continue`` and invite the whole upload. Whenever part of the body is left unread,
the answer carries ``Connection: close``: that connection cannot carry another request.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body exceeds the limit of {limit} bytes (LAFTER_MAX_REQUEST_BYTES); "
            "split the upload into several requests",
        )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 256 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        expects_continue = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
            elif name == b"expect" and value.lower() == b"100-continue":
                expects_continue = True
        received = 0
        exceeded = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded, body_done
            if declared is not None and declared > self.max_bytes:
                exceeded = True
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_done = True
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge(self.max_bytes)
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def draining_send(message: Message) -> None:
            nonlocal body_done
            if message["type"] == "http.response.start" and exceeded and not body_done:
                # Waiting for "100 Continue" and nothing read yet: answer now, never invite the body.
                if not (expects_continue and received == 0):
                    drained = 0
                    while drained <= self.drain_bytes:
                        extra = await receive()
                        if extra["type"] != "http.request":
                            body_done = True
                            break
                        drained += len(extra.get("body", b""))
                        if not extra.get("more_body", False):
                            body_done = True
                            break
                if not body_done:
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
                body_done = True
            await send(message)

        await self.app(scope, limited_receive, draining_send)
