"""Blocking calls that may run torch (embedding, retrieval, adapter loads, index builds), each
on a thread of its own that ends with the call.

Why not `asyncio.to_thread`: torch's OpenMP runtime (libgomp) keeps a team of worker threads
for every thread that ever ran a parallel region, for as long as that thread lives. Once the
process holds more of them than it has CPUs, libgomp stops spinning between parallel regions
everywhere, and every small op of the engine thread pays a futex wake-up. Measured on 2 cores:
after one retrieval call on a pooled worker thread, a 1,050-token prefill went 0.59 -> 0.92 s
and a small elementwise op 0.04 -> 0.17 ms, for the rest of the server's life. A thread that
ends releases its team (tests/server/test_rag.py checks that no thread outlives its call;
bench/prefill.py measures the speed).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a new short-lived thread (with this context's variables, e.g. the
    request id in logs); the awaiting task may be cancelled, the call then runs to its end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = context.run(fn, *args)
        except BaseException as exc:  # delivered to the awaiting task
            loop.call_soon_threadsafe(settle, exc, None)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    threading.Thread(target=target, name="ragtune-blocking", daemon=True).start()
    return await future
