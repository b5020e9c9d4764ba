"""The real server on an emulated AVX2-only CPU (no native bf16: torch's and oneDNN's ISA
capped, as on AMD EPYC without AVX-512): the defaults pick fp32 compute with packed int4
decode weights, say so in /metrics, answer correctly, and keep every row's greedy tokens
independent of its batch neighbours and adapters."""

from __future__ import annotations

import asyncio
import json

import pytest

from ragtune.launcher import start_server
from tests.conftest import ADAPTERS, API_KEY, BASE_MODEL, SERVER_ENV
from tests.engine.test_batching import PROMPTS, chat

EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture(scope="module")
def avx2_server(tmp_path_factory, adapter_root):
    log = tmp_path_factory.mktemp("avx2") / "server.log"
    env = {
        **SERVER_ENV,
        **EMULATED_AVX2,
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapter_root)]),
    }
    args = [arg for name in ADAPTERS for arg in ("--adapter", f"{name}={adapter_root / name}")]
    running = start_server(env, log, args)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def avx2_client(avx2_server):
    import openai

    return openai.AsyncOpenAI(base_url=avx2_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


def test_metrics_name_the_cpu_kind_and_the_kernels(avx2_server):
    import httpx

    text = httpx.get(
        f"{avx2_server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
    ).text
    [line] = [ln for ln in text.splitlines() if ln.startswith("ragtune_engine_info{")]
    from server.engine import native

    # the a8 kernel on its AVX2 path (the emulated kind caps it), torch's int4 without it
    weights = "w4a8 (avx2)" if native.unavailable_reason() is None else "int4"
    assert 'dtype="fp32"' in line and f'weights="{weights}"' in line and 'runner="compact"' in line
    assert 'torch_capability="AVX2"' in line and "avx512" not in line


async def test_fp32_defaults_answer_and_keep_rows_independent_of_neighbours(avx2_client):
    answer, _ = await chat(avx2_client, BASE_MODEL, "What is the capital of France?")
    assert "Paris" in answer
    models = [BASE_MODEL, *ADAPTERS]
    jobs = [(model, prompt) for prompt in PROMPTS[:3] for model in models]
    alone = [await chat(avx2_client, model, prompt) for model, prompt in jobs]
    together = await asyncio.gather(*[chat(avx2_client, m, p) for m, p in jobs])
    assert list(together) == alone
    answers = {job: text for job, (text, _) in zip(jobs, alone, strict=True)}
    changed = [
        m for m in ADAPTERS if any(answers[m, p] != answers[BASE_MODEL, p] for p in PROMPTS[:3])
    ]
    assert len(changed) >= 2  # the adapters really run (one may end like the base here)


def test_a_team_change_keeps_every_bit_on_the_fp32_path(avx2_server):
    """fp32's prompt GEMMs are MKL's, which split their sums by the thread count unless in its
    strict reproducible mode (ragtune/cpu_share.py); the start-up probe lets the team shrink
    only where that holds (server/engine/team_exactness.py)."""
    import openai

    from tests.server.test_busy_neighbour import assert_team_changes_keep_every_bit

    client = openai.OpenAI(base_url=avx2_server.v1, api_key=API_KEY, max_retries=0, timeout=120)
    assert_team_changes_keep_every_bit(avx2_server, client)
