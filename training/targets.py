"""LoRA target modules named for the model being trained.

Configs name Llama's projections (q_proj ... down_proj), which Llama, Mistral, Qwen2/3 and
Gemma 3 share; Phi-3's checkpoint fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`,
and the server's Phi-3 forward takes adapters on exactly those names. So a requested name the
model lacks maps to the fused module holding it; a name that is in neither is an error that
lists what the model has (PEFT's own message only says nothing matched)."""

from __future__ import annotations

from typing import Any

FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def linear_names(model: Any) -> set[str]:
    """The last name component of every linear layer inside the decoder layers."""
    import torch

    names = set()
    for path, module in model.named_modules():
        if ".layers." in f".{path}." and isinstance(module, torch.nn.Linear):
            names.add(path.rsplit(".", 1)[-1])
    return names


def resolve_target_modules(model: Any, requested: list[str]) -> list[str]:
    present = linear_names(model)
    resolved: list[str] = []
    for name in requested:
        target = name if name in present else FUSED.get(name)
        if target is None or target not in present:
            raise ValueError(
                f"adapter.target_modules: {name!r} is not a linear layer of this model "
                f"({model.config.model_type}); it has {sorted(present)}"
            )
        if target not in resolved:
            resolved.append(target)
    return resolved
