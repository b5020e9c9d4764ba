"""Model loading on the real bundled model: conversion cache, fingerprint, quantization."""

from __future__ import annotations

import json

import pytest
import torch

from ragtune.config import ModelConfig, default_home
from ragtune.models import load_base_model, resolve_model_dir
from ragtune.models.bundled import bundled_embedder_dir, bundled_llm_gguf
from ragtune.models.chat import encode_prompt, render_chat
from ragtune.models.convert import MANIFEST, weights_fingerprint


def test_bundled_files_are_found_without_importing_their_packages():
    assert bundled_llm_gguf().stat().st_size > 50_000_000
    assert (bundled_embedder_dir() / "model.safetensors").is_file()


def test_conversion_is_cached_with_a_fingerprint():
    home = default_home()
    model_dir = resolve_model_dir("bundled", home)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["architectures"] == ["LlamaForCausalLM"]
    assert manifest["fingerprint"] == weights_fingerprint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    # A .gguf path to the same file resolves to the same cache entry: no second conversion.
    assert resolve_model_dir(str(bundled_llm_gguf()), home) == model_dir
    assert resolve_model_dir(str(model_dir), home) == model_dir


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'bundled"):
        resolve_model_dir(str(tmp_path / "missing"), tmp_path)


@pytest.mark.parametrize(
    ("quantization", "dtype", "linear_kind"),
    [("nf4", "bf16", "Linear4bit"), ("int8", "fp32", "Linear8bitLt"), ("none", "fp32", "Linear")],
)
def test_load_with_each_quantization_answers(quantization, dtype, linear_kind):
    loaded = load_base_model(
        ModelConfig(quantization=quantization, dtype=dtype, device="auto"), default_home()
    )
    assert loaded.device == ("cuda" if torch.cuda.is_available() else "cpu")
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == linear_kind
    prompt = render_chat(
        loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
    )
    ids = torch.tensor([encode_prompt(loaded.tokenizer, prompt)])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1] :])
    assert len(loaded.fingerprint) == 64
