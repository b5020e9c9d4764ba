"""Tiny random-weight models of every family the compact engine runs, built from their
configs: shared by the runner-level tests and the over-HTTP tests of the families."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Keys a query sees in a sliding-window layer; the prompts of the tests are longer.
WINDOW = 8
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(family: str, vocab_size: int = 512):
    """A two-layer config of the family with its distinguishing features switched on."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = {**COMMON, "vocab_size": vocab_size, "pad_token_id": 0}
    if family == "llama":  # Llama 3.1's rope scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return LlamaConfig(**common, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=WINDOW)
    if family == "qwen2":  # QKV biases; layer 1 slides (max_window_layers=1)
        return Qwen2Config(
            **common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
    if family == "qwen3":
        return Qwen3Config(
            **common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **common,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
        )
    if family == "gemma2":  # soft caps that bite (tiny_model scales q and k up to meet them)
        return Gemma2Config(
            **common,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        )
    if family == "phi3":  # fused qkv/gate_up; a partial rotary factor as Phi-3.5/4 have
        return Phi3Config(
            **common,
            sliding_window=WINDOW,
            partial_rotary_factor=0.5,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(family)


FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# The families `make test` serves and trains end to end (rope scaling; sandwich norms and a
# window; fused projections and partial rotary); the rest there only in `make test-all`
# (every family against Hugging Face and PEFT in-process: tests/engine/test_families.py)
FAST_FAMILIES = ("llama", "gemma3", "phi3")


def tiny_model(family: str, vocab_size: int = 512, seed: int = 0):
    """The family's tiny model in float32, eval mode, with every norm weight randomized (a
    freshly initialized norm is all ones, or all zeros for Gemma, which would hide a norm
    applied in the wrong place)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, vocab_size), attn_implementation="eager"
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(parameter + 0.3 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.5 * torch.randn_like(parameter))
            elif family == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                # scores of a few units, so the soft cap (2.0) changes most greedy tokens
                parameter.mul_(10.0)
    return model.float().eval()


def lora_targets(family: str) -> list[str]:
    if family == "phi3":
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return ALL_MODULES


def peft_adapter(model, family: str, path: Path, rank: int = 8, seed: int = 1):
    """A random PEFT LoRA over every projection the family exposes, saved to `path`;
    returns the PEFT model (eval)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=lora_targets(family),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    peft_model.save_pretrained(path, safe_serialization=True)
    return peft_model


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Hugging Face `generate`'s greedy tokens: the first from the prompt, then `steps`."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps + 1,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def save_model_dir(family: str, path: Path):
    """The family's tiny model with the bundled model's tokenizer (and chat template), saved
    as a model directory the server and `ragtune train` load; returns (model, tokenizer)."""
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models.loader import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    model = tiny_model(family, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def expected_text(model, tokenizer, prompt: str, eos: set[int], max_tokens: int) -> str:
    """What the server should answer to a greedy completion of `prompt` with `max_tokens`:
    Hugging Face's (or PEFT's) greedy tokens up to the first end-of-sequence token."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = hf_greedy(model, ids, max_tokens - 1)
    for i, token in enumerate(tokens):
        if token in eos:
            tokens = tokens[:i]
            break
    # the server holds back an incomplete UTF-8 sequence at the end (no split characters)
    return tokenizer.decode(tokens).removesuffix("\ufffd")


def served_alone_and_mixed(
    v1: str, api_key: str, keys: list[tuple[str, str]], max_tokens: int
) -> tuple[dict, dict]:
    """Greedy completions of each (prompt, model) over HTTP with the official client: one
    after another, then all at once (one mixed batch); two dicts keyed like `keys`."""
    import asyncio

    import openai

    client = openai.AsyncOpenAI(base_url=v1, api_key=api_key, max_retries=0, timeout=300)

    async def complete(prompt: str, which: str) -> str:
        response = await client.completions.create(
            model=which, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return response.choices[0].text

    async def run() -> tuple[dict, dict]:
        alone = {key: await complete(*key) for key in keys}
        mixed = await asyncio.gather(*(complete(*key) for key in keys))
        return alone, dict(zip(keys, mixed, strict=True))

    return asyncio.run(run())


def load_adapter_over_http(v1: str, admin_key: str, name: str, path: Path) -> None:
    """POST /v1/load_lora_adapter (admin scope), which must succeed."""
    import httpx

    response = httpx.post(
        f"{v1}/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
