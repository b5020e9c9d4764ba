"""Run a proxied HTTP request through an ASGI app in this process and yield its response:
first `{"status", "headers"}`, then body bytes. Body pieces that are already waiting are sent
as one (a step of the engine produces many SSE events at once; each Ray message costs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

_END = object()


@dataclass
class ProxiedRequest:
    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    client: str = ""


async def run_asgi(app: ASGIApp, request: ProxiedRequest) -> AsyncIterator[Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": (request.client, 0),
        "server": ("ragtune-replica", 0),
        "state": {},
    }
    queue: asyncio.Queue[Any] = asyncio.Queue()  # ASGI messages, then _END
    gone = asyncio.Event()  # the caller stopped reading: the app sees a disconnect
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        queue.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(run())
    held: Any = None  # a message taken while coalescing, handled next
    try:
        while True:
            message, held = (held, None) if held is not None else (await queue.get(), None)
            if message is _END:
                break
            if message["type"] == "http.response.start":
                headers = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", [])
                ]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                while held is None and not queue.empty():  # coalesce what is already here
                    nxt = queue.get_nowait()
                    if nxt is _END or nxt["type"] != "http.response.body":
                        held = nxt
                    else:
                        chunk += nxt.get("body", b"")
                if chunk:
                    yield chunk
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except Exception:
                task.cancel()
