"""An exception inside one sequence of a running batch fails only that request.

The server runs in this process (the real app on the bundled model, over loopback HTTP) so a
fault can be injected into one sequence: the request with seed POISON_SEED breaks at one
per-sequence point of the engine (its sampling draw, detokenization, stop matching, or the
callback that hands its output to the HTTP layer) once every request of the batch is running.
That request must get OpenAI's error shape (500, no traceback); the others in the same batch
must finish with exactly the output they give alone, and the engine must keep serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from ragtune.config import load_settings
from ragtune.launcher import free_port
from server.engine import engine as engine_module
from server.engine import sampler
from server.engine.sequence import Emit, Sequence
from server.engine.types import GenerationRequest, SamplingParams
from tests.conftest import API_KEY, BASE_MODEL

POISON_SEED = 4242
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHERS = [  # batch neighbours: greedy base and adapter rows, and a seeded sampled row
    {"model": BASE_MODEL, "prompt": "What is the capital of France?", "temperature": 0},
    {"model": "one", "prompt": "List three fruits.", "temperature": 0},
    {"model": BASE_MODEL, "prompt": "Count from one to five.", "temperature": 0.8, "seed": 7},
]
POISONED = {"model": BASE_MODEL, "prompt": "Hi", "temperature": 0.8, "seed": POISON_SEED}


@dataclass
class Fault:
    """Which point breaks for the poisoned request, and how full the batch was when it did."""

    point: str | None = None
    batch_size: int = len(OTHERS) + 1
    batch_sizes: list[int] = field(default_factory=list)
    engine: Any = None

    def arm(self, point: str | None, batch_size: int = len(OTHERS) + 1) -> None:
        self.point, self.batch_size, self.batch_sizes = point, batch_size, []

    def trip(self, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        """Wrap `fn` to raise once, at its first call while the whole batch is running."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            running = self.engine.num_running
            if self.point and running == self.batch_size and not self.batch_sizes:
                self.batch_sizes.append(running)
                raise RuntimeError(f"injected {what} fault")
            return fn(*args, **kwargs)

        return wrapper


FAULT = Fault()


class FaultySequence(Sequence):
    """The engine's Sequence; the poisoned request's one gets a broken per-sequence point."""

    def __init__(
        self, request: GenerationRequest, tokenizer: Any, eos_ids: set[int], emit: Emit
    ) -> None:
        super().__init__(request, tokenizer, eos_ids, emit)
        if request.params.seed != POISON_SEED:
            return
        if FAULT.point == "detokenize":
            self._detok.push = FAULT.trip(self._detok.push, "detokenizer")
        elif FAULT.point == "stop":
            self._stop.feed = FAULT.trip(self._stop.feed, "stop matcher")
        elif FAULT.point == "emit":
            self._emit = FAULT.trip(self._emit, "output callback")


def _sample_row(real: Callable[..., int]) -> Callable[..., int]:
    """sampler.sample_row that fails (once) for the poisoned request's draw only."""
    poisoned = FAULT.trip(real, "sampling")

    def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        if params.seed == POISON_SEED and FAULT.point == "sample":
            return poisoned(logits, params, generator)
        return real(logits, params, generator)

    return draw


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory, fault_root: Path) -> Iterator[str]:
    """The real app under uvicorn on a loopback port, with the fault hooks installed."""
    import uvicorn

    from server.app import create_app

    patch = pytest.MonkeyPatch()
    patch.setattr(engine_module, "Sequence", FaultySequence)
    patch.setattr(sampler, "sample_row", _sample_row(sampler.sample_row))
    work = tmp_path_factory.mktemp("faulty-server")
    settings = load_settings(
        None,
        {
            "api_keys": [API_KEY],
            "audit_log": work / "audit.log",
            "limits": {"max_prompt_tokens": 512, "max_new_tokens": 128},
            "adapters": {"roots": [fault_root], "preload": {"one": str(fault_root / "one")}},
            "retrieval": {"root": work / "indexes"},
            "server": {"log_level": "warning"},
        },
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="faulty-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("in-process server did not become ready")
    FAULT.engine = app.state.ragtune.serving.engine
    yield url
    server.should_exit = True
    thread.join(timeout=60)
    patch.undo()


async def post(http: httpx.AsyncClient, job: dict, stream: bool = False) -> httpx.Response:
    body = {
        "model": job["model"],
        "messages": [{"role": "user", "content": job["prompt"]}],
        "max_tokens": 24,
        "temperature": job["temperature"],
        "stream": stream,
        **({"seed": job["seed"]} if "seed" in job else {}),
    }
    return await http.post("/v1/chat/completions", json=body, headers=AUTH)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def assert_internal_error(error: dict) -> None:
    """OpenAI's error object for a server-side failure: names the exception type only."""
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"]) == ("server_error", "internal_error"), error
    assert error["message"] == "generation failed: RuntimeError", error
    assert "injected" not in error["message"] and "Traceback" not in error["message"]


@pytest.fixture(scope="module")
async def alone(faulty_server: str) -> list[str]:
    """Each neighbour's output when it runs by itself (no fault armed)."""
    FAULT.arm(None)
    async with httpx.AsyncClient(base_url=faulty_server, timeout=300) as http:
        return [text_of(await post(http, job)) for job in OTHERS]


@pytest.mark.parametrize(
    ("point", "stream"),
    [("sample", False), ("detokenize", False), ("stop", False), ("emit", False), ("emit", True)],
)
async def test_one_failing_sequence_fails_only_its_request(
    faulty_server: str, alone: list[str], point: str, stream: bool
) -> None:
    FAULT.arm(point)
    try:
        async with httpx.AsyncClient(base_url=faulty_server, timeout=300) as http:
            poisoned, *others = await asyncio.gather(
                post(http, POISONED, stream=stream), *[post(http, job) for job in OTHERS]
            )
            assert FAULT.batch_sizes == [len(OTHERS) + 1]  # it broke inside the full batch
            assert [text_of(r) for r in others] == alone
            if stream:  # headers were sent: the error arrives as an event, then [DONE]
                assert poisoned.status_code == 200
                events = [line[6:] for line in poisoned.text.splitlines() if line]
                assert events[-1] == "[DONE]"
                assert_internal_error(json.loads(events[-2])["error"])
            else:
                assert poisoned.status_code == 500, poisoned.text
                assert set(poisoned.json()) == {"error"}
                assert_internal_error(poisoned.json()["error"])
            FAULT.arm(None)  # the engine keeps serving, the same request included
            assert text_of(await post(http, POISONED))
            assert text_of(await post(http, OTHERS[0])) == alone[0]
    finally:
        FAULT.arm(None)


async def test_a_step_failing_outside_any_sequence_fails_the_running_requests_only(
    faulty_server: str, alone: list[str]
) -> None:
    """Last resort: the engine thread survives; the running requests get an error, the
    engine keeps serving."""
    scheduler = FAULT.engine.scheduler
    jobs = OTHERS[:2]
    FAULT.arm("step", batch_size=len(jobs))
    patch = pytest.MonkeyPatch()
    patch.setattr(scheduler, "_drop_aborted", FAULT.trip(scheduler._drop_aborted, "step"))
    try:
        async with httpx.AsyncClient(base_url=faulty_server, timeout=300) as http:
            failed = await asyncio.gather(*[post(http, job) for job in jobs])
            assert FAULT.batch_sizes == [len(jobs)]
            for response in failed:
                assert response.status_code == 500, response.text
                error = response.json()["error"]
                assert error["message"] == "generation failed: internal engine error"
            patch.undo()
            assert [text_of(await post(http, job)) for job in jobs] == alone[:2]
    finally:
        patch.undo()
        FAULT.arm(None)
