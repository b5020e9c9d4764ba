"""A prompt chunk's attention in one call per layer: the C++ kernel in csrc/attention_prompt.cpp
(why, and its arithmetic: decode's to the bit, its bf16 pair path on AVX-512 BF16 and its 8
float lanes elsewhere; a few query rows of a KV head per task sharing every key and value
read, each row stopping at its own last visible key).

A row's result depends on its own visible keys alone, on every CPU that runs it, so prompts
come out the same whole, chunked or restored from the prefix cache without the fixed query
blocks and padded keys torch's GEMMs need on AMX (models/attention.py), and a prompt row
equals a decode step at its position. `engine.prompt_attention` chooses (auto: the kernel
where it runs)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from server.engine import native
from server.engine.attention_rows import cpu_kernel_reason, rows_of_heads

if TYPE_CHECKING:
    from server.engine.models.base import DecoderModel

logger = logging.getLogger(__name__)


def unsupported_reason(model: DecoderModel) -> str | None:
    """Why this model's prompts cannot attend on the kernel here, or None where they can:
    what every CPU attention kernel needs (attention_rows.cpu_kernel_reason)."""
    return cpu_kernel_reason(model, model.device)


def uses_pairs(model: DecoderModel) -> bool:
    """Whether the kernel takes its bf16-pair body (else 8 float lanes): where decode
    attention takes its own (attention_rows.cpp), so a prompt row's bits are a decode step's."""
    return model.dtype is torch.bfloat16 and model.head_dim % 32 == 0 and native.attention_pairs()


def resolve(choice: str, model: DecoderModel) -> bool:
    """engine.prompt_attention resolved: 'auto' takes the kernel wherever it runs (saying
    why not on a CPU where it cannot), 'kernel' where it cannot is an error, 'torch' never."""
    if choice == "torch":
        return False
    reason = unsupported_reason(model)
    if reason is not None and choice == "kernel":
        raise ValueError(f"engine.prompt_attention=kernel cannot run here: {reason}")
    if reason is not None and str(model.device).startswith("cpu"):
        logger.info("prompt attention on torch's GEMMs: %s", reason)
    return reason is None


def attend(
    model: DecoderModel,
    q: torch.Tensor,  # [rows, heads, d] one prompt chunk's queries (rotated)
    keys_t: torch.Tensor,  # [kv_heads, d, end] (features may lie the cache's capacity apart)
    values: torch.Tensor,  # [kv_heads, end, d]
    mask: torch.Tensor,  # [rows, end] 0 or -inf
) -> torch.Tensor:
    """The chunk's attention [rows, q_size] in the model's dtype. Shapes, dtypes and this CPU are
    checked here: a wrong one would make the kernel read or write past its buffers."""
    if (reason := unsupported_reason(model)) is not None:
        raise ValueError(f"the prompt attention kernel cannot run here: {reason}")
    d = model.head_dim
    rows, end = mask.shape
    if mask.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(
            f"prompt attention: the mask must be 0/-inf in bf16 or fp32, not {mask.dtype}"
        )
    if (
        model.num_heads % model.num_kv_heads
        or q.shape != (rows, model.num_heads, d)
        or keys_t.shape != (model.num_kv_heads, d, end)
        or values.shape != (model.num_kv_heads, end, d)
        or keys_t.stride(-1) != 1
        or values.stride(-1) != 1
        or {q.dtype, keys_t.dtype, values.dtype} != {model.dtype}
    ):
        raise ValueError("prompt attention: q, keys and values do not match the model")
    q, mask = rows_of_heads(q, d), mask.contiguous()
    out = torch.empty(rows, model.q_size, dtype=model.dtype)
    native.library().attention_prompt(
        q.data_ptr(), q.stride(0), keys_t.data_ptr(), keys_t.stride(0), keys_t.stride(1),
        values.data_ptr(), values.stride(0), values.stride(1), mask.data_ptr(),
        int(mask.dtype is torch.bfloat16), end, rows, model.num_heads, model.num_kv_heads, d,
        model.scale, out.data_ptr(), int(model.dtype is torch.bfloat16),
        int(uses_pairs(model)), torch.get_num_threads(),
    )  # fmt: skip
    return out


__all__ = ["attend", "resolve", "unsupported_reason", "uses_pairs"]
