"""The base model without its decoder projections, for an engine that packs them itself.

The compact engine's packed kinds (w4a8, w8a8, int4) read every decoder projection from the
checkpoint (checkpoint.py). Loading them into the Hugging Face model as well cost the
bitsandbytes import and its nf4 quantization, about 6 s of a 12 s server start on the bundled
model, and kept a second copy of the weights for the server's life. Here they stay on the meta
device; everything else (config, generation config, embeddings, norms, head, biases, rotary
buffers) is what a whole load gives, read from the same files into the same dtype
(tests/test_models.py compares them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ragtune.models.checkpoint import open_checkpoint


def projection_weights(model: torch.nn.Module) -> set[str]:
    """Parameter names of the decoder layers' linear weights: what the engine packs."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}."
    }


def load_without_projections(
    model_dir: Path, dtype: torch.dtype, device: str
) -> tuple[Any | None, str | None]:
    """(model, None) with the projections on the meta device, or (None, why not)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not str(device).startswith("cpu"):
        return None, f"device {device} (only CPUs load without projections)"
    checkpoint = open_checkpoint(model_dir)
    if checkpoint is None:
        return None, "no safetensors checkpoint to read the projections from"
    config = AutoConfig.from_pretrained(model_dir)
    # parameters on the meta device; buffers (rotary frequencies) computed for real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head is no parameter of its own (nor in the checkpoint)
    skipped = projection_weights(model)
    names = [name for name, _ in model.named_parameters()]  # tied ones once
    missing = sorted(name for name in names if name not in checkpoint)
    if not skipped or missing:
        return None, f"the checkpoint lacks {missing[:3]} (names differ from the model's)"
    params = dict(model.named_parameters())
    state = {
        name: checkpoint.tensor(name).to(dtype=params[name].dtype)
        for name in names
        if name not in skipped
    }
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # the head to the embedding just assigned
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the one from_pretrained derives
        model.generation_config = GenerationConfig.from_model_config(config)
    model.eval()
    return model, None
