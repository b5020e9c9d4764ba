"""Sparse (SHiRA) adapters served over HTTP in the batched engine beside LoRA and base rows.

On a tiny random Llama (float32, dense weights): a PEFT SHiRA adapter with PEFT's seeded random
mask and one with an importance-chosen mask (PEFT saves each mask's entries beside the values)
load through `/v1/load_lora_adapter` and give PEFT's greedy tokens, alone and while base,
LoRA and the other sparse adapter run in the same batches; so does one trained by `ragtune
train --sparse-selection gradient` (training/sparse_selection.py). On the bundled model: an adapter
trained by `ragtune train --method sparse` loads the same way and serves PEFT's tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest
import torch

from ragtune.launcher import start_server
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV
from tests.engine.families import (
    ALL_MODULES,
    expected_text,
    load_adapter_over_http,
    peft_adapter,
    save_model_dir,
    served_alone_and_mixed,
)

MAX_TOKENS = 12
PROMPTS = [
    "The warehouse manual says that every pallet must be checked before it leaves the dock",
    "Kubernetes operators reconcile the desired state of a custom resource with the cluster",
]


def shira_adapter(model, path: Path, seed: int, indices: bool):
    """A PEFT SHiRA adapter with random values on every projection, saved to `path`. With
    `indices`, its mask keeps each matrix's largest base weights (an importance choice no seed
    regenerates); without, PEFT's seeded random mask, and the saved indices are dropped, as
    older PEFT versions saved none, so the server draws the mask from the seed."""
    from peft import ShiraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    config = ShiraConfig(
        r=2, target_modules=ALL_MODULES, random_seed=seed, init_weights=False, task_type="CAUSAL_LM"
    )
    if indices:

        def largest(base_layer, r, **_):
            weight = base_layer.weight.detach()
            count = r * (weight.shape[0] + weight.shape[1])
            mask = torch.zeros(weight.numel(), dtype=weight.dtype)
            mask[weight.abs().flatten().topk(count).indices] = 1.0
            return mask.view_as(weight)

        config.mask_fn = largest
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():  # SHiRA values are drawn from randn: scale them to a mild change
        for name, parameter in peft_model.named_parameters():
            if "shira_weight" in name:
                parameter.mul_(0.5)
    peft_model.save_pretrained(path, safe_serialization=True)
    weights = load_file(path / "adapter_model.safetensors")
    assert any(k.endswith(".shira_indices") for k in weights)
    if not indices:
        kept = {k: v for k, v in weights.items() if not k.endswith(".shira_indices")}
        save_file(kept, str(path / "adapter_model.safetensors"))
    return peft_model


def dense_server_env(adapters: Path, model: Path | None = None, served_name: str | None = None):
    """A float32 dense-weight server with `adapters` as its adapter root; `model`: a model
    directory instead of the bundled model."""
    env = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapters)]),
    }
    if model is not None:
        env["RAGTUNE_MODEL__SOURCE"] = str(model)
    if served_name is not None:
        env["RAGTUNE_MODEL__SERVED_MODEL_NAME"] = served_name
    return env


def assert_served_as_references(
    running, tokenizer, references: dict, base: str, changed: tuple[str, ...], prompts=PROMPTS
) -> None:
    """Every (prompt, model) served greedily over HTTP, alone and in one mixed batch, gives
    its reference model's text; each adapter in `changed` changes what `base` says."""
    eos = {tokenizer.eos_token_id}
    with torch.no_grad():
        expected = {
            (prompt, name): expected_text(reference, tokenizer, prompt, eos, MAX_TOKENS)
            for prompt in prompts
            for name, reference in references.items()
        }
    for name in changed:
        assert any(expected[(p, name)] != expected[(p, base)] for p in prompts)
    alone, mixed = served_alone_and_mixed(running.v1, API_KEY, list(expected), MAX_TOKENS)
    assert alone == expected
    assert mixed == expected


def test_sparse_adapters_serve_peft_tokens_beside_lora_and_base(tmp_path):
    model, tokenizer = save_model_dir("llama", tmp_path / "model")
    adapters = tmp_path / "adapters"
    references = {
        "tiny-llama": model,
        "lora": peft_adapter(model, "llama", adapters / "lora"),
        "seeded": shira_adapter(model, adapters / "seeded", seed=3, indices=False),
        "chosen": shira_adapter(model, adapters / "chosen", seed=4, indices=True),
    }
    env = dense_server_env(adapters, tmp_path / "model", "tiny-llama")
    running = start_server(env, tmp_path / "server.log")
    try:
        for name in ("lora", "seeded", "chosen"):
            load_adapter_over_http(running.v1, ADMIN_KEY, name, adapters / name)
        listed = httpx.get(
            f"{running.v1}/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).json()
        assert "seeded" in json.dumps(listed) and "chosen" in json.dumps(listed)
        assert_served_as_references(
            running, tokenizer, references, "tiny-llama", changed=("seeded", "chosen")
        )
    finally:
        running.stop()


@pytest.mark.slow  # ~11 s; sparse training alone: tests/training/test_train.py
def test_a_gradient_selected_adapter_from_ragtune_train_serves_peft_tokens(tmp_path):
    """`ragtune train --method sparse --sparse-selection gradient` on the tiny Llama: the mask
    no seed rebuilds (mask_type 'gradient', the entries saved beside the values) is served."""
    from peft import PeftModel

    from tests.training.test_train import ROWS, VAL, tiny_config, write_chat_data
    from training.trainer import train

    model, tokenizer = save_model_dir("llama", tmp_path / "model")
    config = tiny_config(
        tmp_path / "model",
        write_chat_data(tmp_path / "data", ROWS, VAL),
        method="sparse",
        max_steps=4,
        learning_rate=0.05,
        adapter={"r": 2, "target_modules": ALL_MODULES, "selection": "gradient"},
        output=tmp_path / "adapters" / "gradient",
    )
    result = train(config, home=tmp_path)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["mask_type"] == (
        "gradient"
    )
    reference = PeftModel.from_pretrained(copy.deepcopy(model), result.adapter_dir).eval()
    env = dense_server_env(tmp_path / "adapters", tmp_path / "model", "tiny-llama")
    running = start_server(env, tmp_path / "server.log")
    try:
        load_adapter_over_http(running.v1, ADMIN_KEY, "gradient", result.adapter_dir)
        references = {"tiny-llama": model, "gradient": reference}
        assert_served_as_references(
            running, tokenizer, references, "tiny-llama", changed=("gradient",)
        )
    finally:
        running.stop()


def test_a_sparse_adapter_without_its_mask_is_refused(tmp_path):
    """A mask whose entries were not saved and no seed rebuilds cannot be served exactly."""
    model, _ = save_model_dir("llama", tmp_path / "model")
    path = tmp_path / "adapters" / "lost"
    shira_adapter(model, path, seed=5, indices=False)
    config = json.loads((path / "adapter_config.json").read_text())
    config["random_seed"] = None
    (path / "adapter_config.json").write_text(json.dumps(config))
    env = dense_server_env(tmp_path / "adapters", tmp_path / "model")
    running = start_server(env, tmp_path / "server.log")
    try:
        response = httpx.post(
            f"{running.v1}/load_lora_adapter",
            json={"lora_name": "lost", "lora_path": str(path)},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=60,
        )
        assert response.status_code == 400
        assert "random_seed" in response.json()["error"]["message"]
    finally:
        running.stop()


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    return resolve_model_dir("bundled", default_home())


@pytest.mark.slow  # trains on the bundled model: minutes
def test_trained_sparse_adapter_serves_peft_tokens_on_the_bundled_model(bundled_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.training.test_train import ROWS, VAL, tiny_config, write_chat_data
    from training.trainer import train

    config = tiny_config(
        bundled_dir,
        write_chat_data(tmp_path / "data", ROWS, VAL),
        method="sparse",
        max_steps=6,
        learning_rate=0.05,
        adapter={"r": 8, "alpha": 16, "target_modules": ALL_MODULES},
        output=tmp_path / "adapters" / "sparse",
    )
    result = train(config, home=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    base = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(copy.deepcopy(base), result.adapter_dir).eval()
    env = dense_server_env(tmp_path / "adapters")
    running = start_server(env, tmp_path / "server.log")
    try:
        load_adapter_over_http(running.v1, ADMIN_KEY, "sparse", result.adapter_dir)
        served_name = httpx.get(
            f"{running.v1}/models", headers={"Authorization": f"Bearer {API_KEY}"}
        ).json()["data"][0]["id"]
        references = {served_name: base, "sparse": reference}
        prompts = [r[0] for r in ROWS[:2]]
        assert_served_as_references(
            running, tokenizer, references, served_name, changed=("sparse",), prompts=prompts
        )
    finally:
        running.stop()
