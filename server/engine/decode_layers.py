"""A decode step's decoder layers in one kernel call (csrc/decode_layers.cpp, why there).

The same kernels, in the same order, on the same values as the layer-by-layer route
(models/layer.py, passes.decode): the a8 GEMMs with their fused norms, LoRA rows and
residual adds, the q/k norms on the norm kernel, decode attention with the rotary embedding.
The GLU's act(gate) * up, torch's two ops there, is a table of torch's own activation of
every bf16 value and torch's bf16 product, checked against torch when the table is built.
So a step gives the same bits either way; it only spends no Python between kernels.

Taken where every layer's projections are a8 linears, the compute dtype is bf16, decode
attention runs on its kernel and turns q and k itself, and LoRA rows (if any) all go through
the LoRA rows kernel; elsewhere the layer-by-layer route runs (`unsupported_reason` says why).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import numpy as np
import torch

from server.engine import attention_rows, native
from server.engine.a8 import A8Linear
from server.engine.kv_cache import KVCache
from server.engine.lora_apply import LoraBatch

if TYPE_CHECKING:
    from server.engine.models.base import DecoderModel

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # decode_layers.cpp's Projection order
LAYER_FIELDS = 20  # decode_layers.cpp's Field: codes x4, params x4, bits x4, 6 norms, plan, rope
LORA_FIELDS = 5  # a, a_scales, bt, b_scales, widths (the row_slot is the step's)
BF16_CODES = 1 << 16
# bf16 values torch's vectorized CPU loops take at once (two AVX-512 vectors of 32): a row's
# last values short of a step go through its scalar ops, whose GELU-tanh differs in the last
# bit (seen at 272 features). The table is the vectorized path's, so rows must be whole steps.
TORCH_VECTOR_STEP = 64


def unsupported_reason(model: DecoderModel) -> str | None:
    """Why this model's decode steps cannot run in one call here, or None where they can."""
    from ragtune.hardware import detect

    if model.dtype is not torch.bfloat16:
        return f"the GLU's activation table is for bf16 compute, not {model.dtype}"
    if not model.attention_kernel or not attention_rows.rotates(model):
        return "decode attention is not on its kernel with the rotary embedding inside"
    if not model.norm_kernel:
        return "RMSNorm is not on its kernel"
    for w in model.layers:
        if not all(isinstance(getattr(w, p), A8Linear) for p in PROJECTIONS):
            return "not every projection is an a8 linear (engine.weights w4a8 or w8a8g)"
        if w.qkv_bias is not None:
            return "q/k/v biases (added before the adapters, outside the a8 call)"
        if (w.q_norm is None) != (w.k_norm is None):
            return "a q norm without a k norm"
    if (reason := native.unavailable_reason()) is not None:
        return reason
    # avx512f as detect() allows it: AVX-512 core (F, BW, VL, DQ), as ATEN_CPU_CAPABILITY lets
    # torch use it (the emulated AVX2 kind takes the layer-by-layer route)
    if not native.library().decode_layers_supported() or "avx512f" not in detect().features:
        return "the GLU product needs AVX-512 (F, BW)"
    if model.intermediate % TORCH_VECTOR_STEP:
        return f"intermediate size {model.intermediate} is not a multiple of {TORCH_VECTOR_STEP}"
    return None


def activation_table(activation, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch's activation of every bf16 code, as int16 codes, plus one entry (the kernel's
    gathers read 4 bytes). One contiguous run of 2^16 values: every value through torch's
    vectorized path (whole steps of TORCH_VECTOR_STEP, as the GLU's rows take it)."""
    codes = torch.arange(BF16_CODES, dtype=torch.int32).to(torch.int16).view(dtype)
    values = activation(codes).view(torch.int16)
    return torch.cat((values, values.new_zeros(1))).contiguous()


class DecodeLayers:
    """One model's layers as the kernel takes them: a row of pointers per layer (fixed for
    the model's life: its weights never move) and the activation table."""

    def __init__(self, model: DecoderModel):
        self.lib = native.library()
        self.table = activation_table(model.activation)
        check_glu(self.lib, self.table, model.activation, model.intermediate)
        self.windows = {window: i for i, window in enumerate(model.windows)}
        self.rope_kinds = sorted({w.rope for w in model.layers})
        rows = np.zeros((model.num_layers, LAYER_FIELDS), dtype=np.int64)
        for index, w in enumerate(model.layers):
            linears = [getattr(w, p) for p in PROJECTIONS]
            rows[index, 0:4] = [linear.codes_ptr for linear in linears]
            rows[index, 4:8] = [linear.params_ptr for linear in linears]
            rows[index, 8:12] = [linear.bits for linear in linears]
            norms = (w.input_norm, w.mlp_norm, w.q_norm, w.k_norm, w.attn_out_norm, w.mlp_out_norm)
            rows[index, 12:18] = [
                0 if n is None else model._kernel_norm_weight(n).data_ptr() for n in norms
            ]
            rows[index, 18] = self.windows[w.window]
            rows[index, 19] = self.rope_kinds.index(w.rope)
        self.layers = rows
        self._lora_key: tuple | None = None  # what _lora_tables were built for
        self._lora_tables: np.ndarray | None = None

    def run(
        self,
        model: DecoderModel,
        x: torch.Tensor,  # [rows, hidden] the embedded tokens
        steps: dict,  # window -> attention_rows.RowsPlan
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        lora: LoraBatch | None,
    ) -> torch.Tensor | None:
        """The last layer's output [rows, hidden], or None where this step's adapters need
        the layer-by-layer route (float LoRA GEMMs, sparse adapters)."""
        rows = x.shape[0]
        row_slot, lora_rows = None, None
        if lora is not None:
            lora_rows = self._lora_rows(lora)
            if lora_rows is None:
                return None
            row_slot = lora.row_slot.data_ptr()
        plans = np.zeros((len(self.windows), 3), dtype=np.int64)
        for window, i in self.windows.items():
            step = steps[window]
            plans[i] = (step.bias.data_ptr(), step.writes.data_ptr(), step.length)
        ropes = np.array(
            [
                attention_rows.rope_arguments(model, rotary[kind], rows, model.dtype)
                for kind in self.rope_kinds
            ],
            dtype=np.int64,
        )
        keys, values, capacities = self._cache(cache)
        out = torch.empty_like(x)
        self.lib.decode_layers(
            self.layers.ctypes.data, model.num_layers, keys.ctypes.data, values.ctypes.data,
            capacities.ctypes.data, plans.ctypes.data, ropes.ctypes.data, row_slot,
            None if lora_rows is None else lora_rows.ctypes.data, self.table.data_ptr(), rows,
            model.hidden, model.num_heads, model.num_kv_heads, model.head_dim,
            model.intermediate, model.scale, model.eps, torch.get_num_threads(),
            native.chosen_isa(), int(native.attention_pairs()), x.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        return out

    @staticmethod
    def _cache(cache: KVCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's keys, values and capacity, read every step (~10 µs): a resize moves
        every layer's tensors, and a stale pointer would be written through."""
        keys, values = cache.keys_t, cache.values
        return (
            np.fromiter((t.data_ptr() for t in keys), dtype=np.int64, count=len(keys)),
            np.fromiter((t.data_ptr() for t in values), dtype=np.int64, count=len(values)),
            np.fromiter((t.shape[-1] for t in keys), dtype=np.int64, count=len(keys)),
        )

    def _lora_rows(self, lora: LoraBatch) -> np.ndarray | None:
        """[layers, 4, LORA_FIELDS] the LoRA rows kernel's tables of each layer and group that
        one of this step's slots uses (0 elsewhere), as LoraBatch.layer hands them to
        one_kernel_call; None where a row's adapter needs another route. Kept while the same
        slots are in use and none was loaded or cleared: building it walks every layer and
        group (~0.2 ms, a twentieth of SmolLM2's one-row step)."""
        slots = lora.slots
        if lora.row_slot is None or slots.tables is None or lora.active_groups or lora.sparse:
            return None
        in_use = frozenset(lora.rowwise)
        key = (slots, slots.generation, in_use)  # the slots object itself: compared by identity
        if self._lora_key == key:
            return self._lora_tables
        out = np.zeros((len(slots.tables), len(PROJECTIONS), LORA_FIELDS), dtype=np.int64)
        for index, tables in enumerate(slots.tables):
            for p, group in enumerate(PROJECTIONS):
                table = tables.get(group)
                if table is not None and table.holds_any(in_use):
                    out[index, p] = [
                        ctypes.addressof(part)
                        for part in (
                            table.a,
                            table.a_scales,
                            table.bt,
                            table.b_scales,
                            table.widths,
                        )
                    ]
        self._lora_key, self._lora_tables = key, out
        return out


def glu(lib, table: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The kernel's act(gate) * up of bf16 rows [rows, 2 * intermediate]."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    lib.decode_glu(gate_up.data_ptr(), rows, width // 2, table.data_ptr(), out.data_ptr(),
                   torch.get_num_threads())  # fmt: skip
    return out


def check_glu(lib, table: torch.Tensor, activation, intermediate: int) -> None:
    """The kernel's GLU against torch's on rows with every special value (the table holds
    torch's activation by construction; this checks the product and its rounding too)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(16, 2 * intermediate, generator=generator) * 4
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, float("inf"), float("-inf"),
                            float("nan"), 1e-20, 1e20, 88.0, -88.0])  # fmt: skip
    rows[0, : special.numel()] = special
    rows[1, intermediate : intermediate + special.numel()] = special
    rows[2, : special.numel()] = special.flip(0)
    rows[2, intermediate : intermediate + special.numel()] = special
    gate_up = rows.bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = (activation(gate) * up).view(torch.int16)
    got = glu(lib, table, gate_up).view(torch.int16)
    if not torch.equal(expected, got):
        raise RuntimeError("the decode layers' GLU differs from torch's here")


__all__ = ["DecodeLayers", "activation_table", "glu", "unsupported_reason"]
