"""ASGI middleware: the body-size limit, which must see the raw request, and a plain-ASGI
wrapper for HTTP-only handlers (request ids and metrics, see server/app.py).

Starlette's own limiter answers a declared-too-large body in plain text, not OpenAI's error
shape, and FastAPI turns errors raised mid-read into a generic 400; so the body is read here,
bounded, before the app sees it (request bodies are small: prompts, not uploads).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError, error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLargeError(
            f"request body exceeds {self.max_bytes} bytes (limits.max_body_bytes)"
        )
        await error_response(error)(scope, receive, send)


class HTTPOnly:
    """Runs `handler(scope, receive, send, app)` for HTTP requests, passes anything else (the
    lifespan) straight to the app. Plain ASGI, so a streamed response's chunks go to the
    client without an extra task or queue each."""

    def __init__(
        self,
        app: ASGIApp,
        handler: Callable[[Scope, Receive, Send, ASGIApp], Awaitable[None]],
    ):
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handler(scope, receive, send, self.app)
