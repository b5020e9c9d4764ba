"""An adapter whose weights are finite but whose scale overflows the activations (lora_alpha
1e30 passes every load-time check) makes the model produce NaN for its rows.

Such a request must fail alone with OpenAI's error shape instead of returning garbage, and it
must not leave NaN in its KV cache slot: masked attention multiplies masked positions by zero,
and 0 * NaN is NaN, so the next request to reuse that slot (any model) would silently answer
nonsense. A scale that overflows the weights themselves is refused at load time.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from tests.conftest import BASE_MODEL
from tests.faults.test_deleted_adapter import post_chat
from tests.server.test_adapters import CLIENT, assert_error, chat, load, must_load, unload

LONG_PROMPT = (  # longer than the other prompts, so its stale cache positions would be read
    "Write a detailed description of a lighthouse on a rocky coast at night, including the "
    "keeper, the storm, the ships passing by and the sound of the waves on the rocks."
)


def with_alpha(source: Path, target: Path, alpha: float) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return target


def overflow_request(http: httpx.Client) -> httpx.Response:
    body = {
        "model": "overflow",
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 4,
        "temperature": 0,
    }
    return http.post("/v1/chat/completions", json=body, headers=CLIENT)


def assert_failed_alone(response: httpx.Response) -> None:
    error = assert_error(response, 500, code="internal_error")
    assert error["message"] == "generation failed: NonFiniteLogitsError"


def test_nan_rows_fail_alone_and_do_not_poison_the_cache_slot(
    fault_root: Path, fault_http: httpx.Client, fault_client: openai.OpenAI
) -> None:
    must_load(fault_http, "overflow", with_alpha(fault_root / "one", fault_root / "ovf", 1e30))
    must_load(fault_http, "steady", fault_root / "one")
    models = [BASE_MODEL, "steady"]
    before = {m: chat(fault_client, m) for m in models}

    for model in models:  # one after the other: the next request reuses the same slot
        assert_failed_alone(overflow_request(fault_http))
        assert chat(fault_client, model) == before[model]

    with ThreadPoolExecutor(3) as pool:  # in one batch with neighbours
        poisoned = pool.submit(overflow_request, fault_http)
        answers = list(pool.map(lambda m: chat(fault_client, m), models))
    assert_failed_alone(poisoned.result())
    assert answers == [before[m] for m in models]
    assert [chat(fault_client, m) for m in models] == [before[m] for m in models]
    for name in ("overflow", "steady"):
        assert unload(fault_http, name).status_code == 200


def test_a_scale_that_overflows_the_weights_is_refused(
    fault_root: Path, fault_http: httpx.Client
) -> None:
    adapter = with_alpha(fault_root / "one", fault_root / "inf-scale", 1e45)
    error = assert_error(load(fault_http, "infscale", adapter), 400, code="invalid_adapter")
    assert "lora_alpha" in error["message"]
    assert_error(post_chat(fault_http, "infscale"), 404, code="model_not_found")
