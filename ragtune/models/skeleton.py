"""The base model without its decoder projections, for an engine that packs them itself.

The compact engine's packed kinds (w4a8, w8a8, int4) read every decoder projection from the
checkpoint (checkpoint.py). Loading them into the Hugging Face model as well cost the
bitsandbytes import and its nf4 quantization, about 6 s of a 12 s server start on the bundled
model, and kept a second copy of the weights for the server's life. Here they stay on the meta
device; everything else (config, generation config, embeddings, norms, head, biases, rotary
buffers) is what a whole load gives, read from the same files into the same dtype
(tests/test_models_skeleton.py compares them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ragtune.models.checkpoint import Checkpoint, open_checkpoint

logger = logging.getLogger(__name__)


def projection_weights(model: torch.nn.Module) -> set[str]:
    """Parameter names of the decoder layers' linear weights: what the engine packs (only
    the text decoder's: a vision tower's linears stay loaded)."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    layers = f"{prefix}.layers." if prefix else "layers."
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(layers)
    }


FLOAT_DTYPES = {"F32", "BF16", "F16"}


def load_without_projections(
    model_dir: Path, dtype: torch.dtype, device: str
) -> tuple[Any | None, str | None]:
    """(model, None) with the projections on the meta device, or (None, why not)."""
    if not str(device).startswith("cpu"):
        return None, f"device {device} (only CPUs load without projections)"
    checkpoint = open_checkpoint(model_dir)
    if checkpoint is None:
        return None, "no safetensors checkpoint to read the projections from"
    try:
        return _load(model_dir, checkpoint, dtype)
    except Exception as exc:  # anything odd in the files: the whole load, which says more
        logger.warning("loading without projections failed (%s: %s)", type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}"


def _load(model_dir: Path, checkpoint: Checkpoint, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        # FP8 / bitsandbytes / GPTQ files hold the projections in their own format (with
        # scales beside them): only the whole load knows how to read them
        return None, "a pre-quantized checkpoint (config.quantization_config)"
    # parameters on the meta device; buffers (rotary frequencies) computed for real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head is no parameter of its own (nor in the checkpoint)
    skipped = projection_weights(model)
    params = dict(model.named_parameters())  # tied ones once
    missing = sorted(name for name in params if name not in checkpoint)
    if not skipped:
        return None, "no decoder projections found in the model"
    if missing:
        return None, f"the checkpoint lacks {missing[:3]} (names differ from the model's)"
    for name in sorted(skipped):
        shape, stored = checkpoint.shape_and_dtype(name)
        if stored not in FLOAT_DTYPES or tuple(shape) != tuple(params[name].shape):
            return None, f"{name} is stored as {stored} {shape}, not a plain float matrix"
    state = {
        name: checkpoint.tensor(name).to(dtype=param.dtype)
        for name, param in params.items()
        if name not in skipped
    }
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # the head to the embedding just assigned
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: derived from config.json, as transformers does
        model.generation_config = GenerationConfig.from_pretrained(
            model_dir, config_file_name="config.json", _from_model_config=True
        )
    model.eval()
    return model, None
