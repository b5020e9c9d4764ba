"""Each model family served over HTTP from a model directory (a tiny random model of the
family in float32 with dense weights, the bundled tokenizer): the official `openai` client
gets Hugging Face `generate`'s greedy tokens, a PEFT LoRA loaded through
`/v1/load_lora_adapter` gives PEFT's, and neither changes when base and adapter requests run
concurrently in one batch. Prompts are longer than the sliding window."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from ragtune.launcher import start_server
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV
from tests.engine.families import (
    FAMILY_NAMES,
    FAST_FAMILIES,
    expected_text,
    load_adapter_over_http,
    peft_adapter,
    save_model_dir,
    served_alone_and_mixed,
)

MAX_TOKENS = 16
PROMPTS = [
    "The warehouse manual says that every pallet must be checked before it leaves the dock",
    "Kubernetes operators reconcile the desired state of a custom resource with the cluster",
    "Translate the following procedure into plain steps: open the valve, wait, close it",
]


@pytest.fixture(
    scope="module",
    params=[
        name if name in FAST_FAMILIES else pytest.param(name, marks=pytest.mark.slow)
        for name in FAMILY_NAMES
    ],
)
def served(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"family-{name}")
    model, tokenizer = save_model_dir(name, root / "model")
    peft_model = peft_adapter(model, name, root / "adapters" / "tuned")
    env = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__SOURCE": str(root / "model"),
        "RAGTUNE_MODEL__SERVED_MODEL_NAME": f"tiny-{name}",
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root / "adapters")]),
    }
    running = start_server(env, root / "server.log")
    eos = {tokenizer.eos_token_id, *_as_set(model.generation_config.eos_token_id)}
    yield name, running, tokenizer, model, peft_model, root, eos
    running.stop()


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}


def test_family_serves_hugging_face_and_peft_tokens_alone_and_mixed(served):

    name, running, tokenizer, model, peft_model, root, eos = served
    models = httpx.get(f"{running.v1}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    [listed] = [m for m in models.json()["data"] if m["id"] == f"tiny-{name}"]
    assert listed["runner"] == f"compact:{'llama' if name == 'mistral' else name}"
    load_adapter_over_http(running.v1, ADMIN_KEY, "tuned", root / "adapters" / "tuned")

    with torch.no_grad():
        expected = {
            (prompt, which): expected_text(m, tokenizer, prompt, eos, MAX_TOKENS)
            for prompt in PROMPTS
            for which, m in ((f"tiny-{name}", model), ("tuned", peft_model))
        }
    assert any(expected[(p, f"tiny-{name}")] != expected[(p, "tuned")] for p in PROMPTS)

    alone, mixed = served_alone_and_mixed(running.v1, API_KEY, list(expected), MAX_TOKENS)
    assert alone == expected, name
    assert mixed == expected, name


def test_echo_logprobs_score_prompts_as_hugging_face(served):
    """lm-eval's scoring request: token-id prompts, echo, logprobs, max_tokens 0; each
    prompt token after the first gets log_softmax of the row before it, the first None."""
    name, running, tokenizer, model, _, _, _ = served
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    response = httpx.post(
        f"{running.v1}/completions",
        json={
            "model": f"tiny-{name}",
            "prompt": prompts,
            "echo": True,
            "logprobs": 2,
            "max_tokens": 0,
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert body["usage"]["completion_tokens"] == 0
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == tokenizer.decode(prompt)
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt)
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
        chosen = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(
            torch.tensor(logprobs["token_logprobs"][1:]), chosen, rtol=1e-4, atol=1e-4
        )
        assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:])
