"""The engine's kernel settings (engine.weights, engine.decode_attention, engine.decode_layers)
resolved for one model on one device: what `auto` becomes here, and a clear error where an
explicit choice cannot run. The runner (server/engine/runner.py) builds with the answers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ragtune.config import EngineConfig, ModelConfig
from ragtune.models import LoadedModel, resolve_model_dir
from ragtune.models.checkpoint import open_checkpoint
from ragtune.models.loader import compute_dtype, pick_device
from server.engine import a8, attention_rows, decode_layers, native
from server.engine.linear import W8A8Linear, is_bnb, packed_weights_supported
from server.engine.models import DecoderModel, model_class

logger = logging.getLogger(__name__)


def lora_dtype(model: DecoderModel) -> torch.dtype:
    """The dtype of the LoRA GEMMs. Where decode already runs them on a fixed row count (the
    GEMMs' bits depend on it: AMX, MKL) and the device is a CPU, float32: MKL's small fp32
    GEMMs cost about half of oneDNN's bf16 ones at LoRA sizes (AMX Xeon, one thread: 31 vs
    52 µs for the qkv group's pair), and a rank-r product is cheap in any dtype. Prompt
    chunks there use bf16 copies of the factors (LoraSlots.prompt_dtype): at hundreds of
    rows the fp32 GEMMs and their casts cost more than the base prefill's own GEMMs.
    Elsewhere the compute dtype, whose GEMMs were checked row-independent at start-up, so
    prompt rows stay independent of chunking (the prefix cache relies on it)."""
    if model.fixed_decode_rows and model.device == "cpu":
        return torch.float32
    return model.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(
        dtype, str(dtype)
    )


def decode_weights(config: EngineConfig, loaded: LoadedModel) -> str:
    """engine.weights resolved for this model. 'auto', on a CPU (bf16 or fp32 compute) where
    ragtune's a8 kernel builds: w4a8 where the checkpoint's layers already lie on a 4-bit
    grid (a Q4_0/Q4_1 GGUF: nothing lost), else w8a8 (5- to 16-bit checkpoints keep 8 bits);
    int4 on torch's kernel where the a8 kernel cannot run (the reason in the log); dense on
    GPUs (int4 is an opt-in there, measured in docs/performance.md)."""
    kind, dtype, device = config.weights, loaded.dtype, loaded.device
    if kind == "auto":
        if not packs_weights(config, dtype, device):
            return "dense"
        if (reason := native.unavailable_reason()) is not None:
            logger.warning("engine.weights auto: int4, as the a8 kernel cannot run: %s", reason)
            return "int4"
        return "w4a8" if checkpoint_on_4bit_grid(loaded) else "w8a8"
    if kind != "dense" and not packed_weights_supported(kind, dtype, device):
        raise ValueError(
            f"engine.weights={kind} needs bf16 or fp32 compute on a CPU, or (int4 only) bf16 "
            f"on a CUDA GPU (not {dtype} on {device})"
        )
    if kind == "w8a8" and not W8A8Linear.supported():
        raise ValueError("engine.weights=w8a8 needs oneDNN's int8 linear, which this torch lacks")
    if kind == "w4a8" and (reason := native.unavailable_reason()) is not None:
        raise ValueError(f"engine.weights=w4a8 cannot run here: {reason}")
    return kind


def packs_weights(config: EngineConfig, dtype: torch.dtype, device: str) -> bool:
    """Whether engine.weights resolves to a packed kind (not dense) for this compute."""
    if config.weights == "auto":
        return is_cpu(device) and packed_weights_supported("int4", dtype, device)
    return config.weights != "dense"


def packs_from_checkpoint(engine: EngineConfig, model: ModelConfig, home: Path) -> bool:
    """Whether the compact engine will pack this base model's projections from its checkpoint
    (a compact family, packed weights), so the loader need not load them
    (load_base_model's `packs_projections`)."""
    from transformers import AutoConfig

    device = pick_device(model.device)
    if not packs_weights(engine, compute_dtype(model, device), device):
        return False
    family, _ = model_class(AutoConfig.from_pretrained(resolve_model_dir(model.source, home)))
    return family is not None


def attention_kernel(
    config: EngineConfig, model: DecoderModel, device: str, fixed_layout: bool
) -> bool:
    """engine.decode_attention resolved: whether decode steps attend on ragtune's kernel
    (engine/attention_rows.py). 'auto' takes it wherever it runs, saying why not on a CPU
    where it cannot; 'kernel' where it cannot is an error."""
    if config.decode_attention == "torch":
        return False
    reason = attention_rows.unsupported_reason(model, device, fixed_layout)
    if reason is not None and config.decode_attention == "kernel":
        raise ValueError(f"engine.decode_attention=kernel cannot run here: {reason}")
    if reason is not None and is_cpu(device):
        logger.warning("decode attention on torch's GEMMs: %s", reason)
    return reason is None


def layers_kernel(
    config: EngineConfig, model: DecoderModel, device: str
) -> decode_layers.DecodeLayers | None:
    """engine.decode_layers resolved: a step's layers in one kernel call where it runs
    (engine/decode_layers.py), saying why not on a CPU where it cannot; 'kernel' where it
    cannot is an error."""
    if config.decode_layers == "python" or not is_cpu(device):
        if config.decode_layers == "kernel":
            raise ValueError(f"engine.decode_layers=kernel runs on a CPU, not {device}")
        return None
    reason = decode_layers.unsupported_reason(model)
    if reason is None:
        try:
            return decode_layers.DecodeLayers(model)
        except RuntimeError as error:  # its GLU check against torch failed here
            reason = str(error)
    if config.decode_layers == "kernel":
        raise ValueError(f"engine.decode_layers=kernel cannot run here: {reason}")
    logger.info("decode layers one call at a time: %s", reason)
    return None


def weights_label(kind: str) -> str:
    """The decode weights and the kernel that multiplies them, for logs and metrics."""
    if kind == "w4a8" or (kind == "w8a8" and native.unavailable_reason() is None):
        return f"{kind} ({native.isa()})"
    return "w8a8 (onednn)" if kind == "w8a8" else kind


def checkpoint_on_4bit_grid(loaded: LoadedModel) -> bool:
    """Whether the first layer's projections, as the packed kinds read them (the checkpoint
    file, else the loaded weights), all lie on the 4-bit grid (a8.lies_on_4bit_grid)."""
    source = open_checkpoint(loaded.model_dir)
    if source is not None:
        names = [k for k in source if ".layers.0." in k and k.endswith("proj.weight")]
        weights = [source.tensor(name) for name in names]
    else:
        weights = [
            module.weight.detach()
            for name, module in loaded.model.named_modules()
            if ".layers.0." in f".{name}." and isinstance(module, torch.nn.Linear)
            and not is_bnb(module)
        ]  # fmt: skip
    fits = [w for w in weights if w.dim() == 2 and w.shape[1] % a8.GROUP == 0]
    return bool(fits) and all(a8.lies_on_4bit_grid(w) for w in fits)


def is_cpu(device) -> bool:
    return str(device).startswith("cpu")
