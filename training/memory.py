"""`ragtune estimate-memory`: peak training memory from the model's shape.

    total = weights + adapter/trainable state (weights, gradients, Adam moments)
            + activations kept for backward + logits/loss + runtime overhead

* weights: 4 B/param (fp32), 2 (bf16/fp16); QLoRA stores the linear layers in NF4
  (0.5 B/param + one fp32 absmax per 64-weight block), embeddings and lm_head unquantized.
* full fine-tuning is mixed precision as the HF Trainer runs it: fp32 master weights (4),
  the 16-bit copy autocast keeps for backward (2), fp32 gradients (4) and Adam's two fp32
  moments (8) = 18 B/param; in fp32 it is 16 B/param.
* LoRA/QLoRA train r*(in+out) parameters per target matrix, kept in fp32: 16 B/param.
* activations per layer and token (SDPA/flash attention, no s^2 score matrix): the saved
  inputs of norms, projections, attention and SwiGLU MLP, about 8h + 2h_kv + 4i elements,
  plus the dropout copy each LoRA target keeps of its input; gradient checkpointing keeps
  only each layer's input plus one layer's worth.
* logits: batch*seq*vocab in the compute dtype, plus the fp32 upcast and its gradient.
* runtime: the framework itself: 0.5 GiB on a GPU (CUDA context); on CPU the process
  baseline measured here after importing torch/transformers/peft, 0.625 GiB.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

GiB = 1024**3
RUNTIME_OVERHEAD = {"cuda": GiB // 2, "cpu": GiB * 5 // 8}
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64  # 4-bit weights + fp32 absmax per 64-block
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only (Llama-style, SwiGLU) transformer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + self.embedding_params + norms


# Published shapes; other sizes scale the nearest one's depth.
REFERENCE_SHAPES: dict[str, ModelShape] = {
    "135M": ModelShape(30, 576, 1536, 9, 3, 49152, tied_embeddings=True),  # SmolLM2-135M
    "360M": ModelShape(32, 960, 2560, 15, 5, 49152, tied_embeddings=True),  # SmolLM2-360M
    "1B": ModelShape(16, 2048, 8192, 32, 8, 128256, tied_embeddings=True),  # Llama-3.2-1B
    "1.7B": ModelShape(24, 2048, 8192, 32, 32, 49152, tied_embeddings=True),  # SmolLM2-1.7B
    "3B": ModelShape(28, 3072, 8192, 24, 8, 128256, tied_embeddings=True),  # Llama-3.2-3B
    "7B": ModelShape(32, 4096, 11008, 32, 32, 32000),  # Llama-2-7B
    "8B": ModelShape(32, 4096, 14336, 32, 8, 128256),  # Llama-3-8B
    "13B": ModelShape(40, 5120, 13824, 40, 40, 32000),  # Llama-2-13B
    "70B": ModelShape(80, 8192, 28672, 64, 8, 32000),  # Llama-2-70B
}


def parse_params(text: str) -> float:
    """'7B', '135M', '1.5b', '7e9' -> parameter count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMBT]?)\s*", text, re.I)
    if not match:
        raise ValueError(f"cannot read a parameter count from {text!r} (try 7B or 135M)")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2).upper()]
    return float(match.group(1)) * scale


def shape_for(params: str | None = None, model: str | None = None) -> ModelShape:
    """The shape of a model directory ('bundled' resolves to the bundled model), or of a
    parameter count (nearest published shape, depth scaled to the count)."""
    if model:
        return _shape_from_config(_model_config_path(model))
    if not params:
        raise ValueError("give a parameter count or a model")
    key = params.strip().upper()
    if key in REFERENCE_SHAPES:
        return REFERENCE_SHAPES[key]
    count = parse_params(params)
    nearest = min(REFERENCE_SHAPES.values(), key=lambda s: abs(math.log(s.params / count)))
    per_layer = (nearest.params - nearest.embedding_params) / nearest.layers
    layers = max(1, round((count - nearest.embedding_params) / per_layer))
    return ModelShape(
        layers,
        nearest.hidden,
        nearest.intermediate,
        nearest.heads,
        nearest.kv_heads,
        nearest.vocab,
        nearest.tied_embeddings,
    )


def _model_config_path(model: str) -> Path:
    from ragtune.config import bundled_model_name, default_home

    if bundled_model_name(model):  # 'bundled' or 'bundled:NAME'
        from ragtune.models import resolve_model_dir

        return resolve_model_dir(model, default_home()) / "config.json"
    path = Path(model)
    return path / "config.json" if path.is_dir() else path


def _shape_from_config(path: Path) -> ModelShape:
    config = json.loads(path.read_text(encoding="utf-8"))
    heads = config["num_attention_heads"]
    return ModelShape(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


@dataclass
class MemoryEstimate:
    method: str
    params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.overhead_bytes
        )

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate(
    shape: ModelShape,
    method: Literal["lora", "qlora", "full"] = "lora",
    seq_len: int = 512,
    batch: int = 1,
    dtype: str = "bf16",
    lora_rank: int = 16,
    gradient_checkpointing: bool = False,
    target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    lora_dropout: bool = True,
    device: Literal["cuda", "cpu"] = "cuda",
) -> MemoryEstimate:
    width = DTYPE_BYTES[dtype]
    tokens = seq_len * batch
    linears = shape.linear_shapes()
    targets = [name for name in target_modules if name in linears]

    if method == "full":
        trainable = shape.params
        master = 4 * shape.params
        autocast_copy = 0 if dtype == "fp32" else width * shape.params
        weights = master + autocast_copy
        gradients = 4 * trainable
        optimizer = 8 * trainable
    else:
        trainable = shape.layers * sum(lora_rank * sum(linears[name]) for name in targets)
        other = shape.params - shape.linear_params
        if method == "qlora":
            base = int(shape.linear_params * NF4_BYTES_PER_PARAM) + other * width
        else:
            base = shape.params * width
        weights = base + 4 * trainable
        gradients = 4 * trainable
        optimizer = 8 * trainable

    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    per_token_layer = 8 * h + 2 * kv + 4 * i
    if method != "full" and lora_dropout:
        per_token_layer += sum(linears[name][0] for name in targets) + lora_rank * len(targets)
    if gradient_checkpointing:
        activations = tokens * width * (shape.layers * h + per_token_layer)
    else:
        activations = tokens * width * shape.layers * per_token_layer
    logits = tokens * shape.vocab * (width + 4 + 4)

    return MemoryEstimate(
        method=method,
        params=shape.params,
        trainable_params=trainable,
        weights_bytes=int(weights),
        gradients_bytes=int(gradients),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations),
        logits_bytes=int(logits),
        overhead_bytes=RUNTIME_OVERHEAD[device],
    )


def format_estimate(result: MemoryEstimate) -> str:
    def gib(value: int) -> str:
        return f"{value / GiB:8.2f} GiB"

    rows = [
        ("method", result.method),
        ("parameters", f"{result.params / 1e9:.3f} B"),
        ("trainable", f"{result.trainable_params / 1e6:.2f} M"),
        ("weights", gib(result.weights_bytes)),
        ("gradients", gib(result.gradients_bytes)),
        ("optimizer state", gib(result.optimizer_bytes)),
        ("activations", gib(result.activations_bytes)),
        ("logits + loss", gib(result.logits_bytes)),
        ("runtime overhead", gib(result.overhead_bytes)),
        ("total", gib(result.total_bytes)),
    ]
    return "\n".join(f"{name:<18}{value}" for name, value in rows)
