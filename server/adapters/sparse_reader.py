"""Read a PEFT SHiRA adapter (`ragtune train --method sparse`) into sparse-adapter entries.

PEFT saves the trained values (`...q_proj.shira_weight`, r * (in + out) per matrix) and,
beside them, which entries they belong to (`...q_proj.shira_indices`: [2, nnz] rows and
columns; float32 when saved on Windows). Values follow the order of those indices. A file
without indices is read as PEFT would rebuild it: `mask_type: random` with a `random_seed`
draws the same permutation here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from server.adapters.errors import AdapterError
from server.engine.sparse import SparseAdapterWeights

if TYPE_CHECKING:
    from server.adapters.loader import BaseSpec

INDICES_SUFFIX = ".shira_indices"
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.shira_weight(?:\.[\w-]+)?$")


def read_shira(
    config: dict[str, Any], spec: BaseSpec, tensors: dict[str, torch.Tensor], key: str
) -> SparseAdapterWeights:
    rank = config["r"]
    seed = config.get("random_seed")
    indices = {k: v for k, v in tensors.items() if k.endswith(INDICES_SUFFIX)}
    weights = {k: v for k, v in tensors.items() if not k.endswith(INDICES_SUFFIX)}
    missing = [k for k in weights if _indices_name(k) not in indices]
    if missing:
        if config.get("mask_type", "random") != "random":
            raise AdapterError(
                f"{missing[0]!r} has no shira_indices and mask_type "
                f"{config.get('mask_type')!r} cannot be rebuilt: save the adapter with PEFT's "
                "save_pretrained, which stores them"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AdapterError(
                f"{missing[0]!r} has no shira_indices and adapter_config.json no integer "
                "random_seed, so the entries of its random mask cannot be recovered"
            )
    masks: dict[tuple[int, int], torch.Tensor] = {}  # (out, in) -> flat indices (one seed)
    entries = {}
    for name, values in weights.items():
        match = _KEY.search(name)
        if not match:
            raise AdapterError(f"weight {name!r} targets a module this server cannot adapt")
        layer, module = int(match[1]), match[2]
        if module not in spec.module_shapes:
            raise AdapterError(f"weight {name!r}: the base model has no module {module!r}")
        if layer >= spec.num_layers:
            raise AdapterError(f"weight {name!r}: the base model has {spec.num_layers} layers")
        in_features, out_features = spec.module_shapes[module]
        count = rank * (in_features + out_features)
        if values.dim() != 1 or values.numel() != count:
            raise AdapterError(
                f"weight {name!r}: {tuple(values.shape)} values, expected r * (in + out) = "
                f"{count} for this base ({in_features} -> {out_features}, r={rank}): trained "
                "for a different base model?"
            )
        if not torch.isfinite(values).all():
            raise AdapterError(f"layer {layer} {module}: weights contain NaN or Inf")
        if _indices_name(name) not in indices:
            shape = (out_features, in_features)
            if shape not in masks:
                masks[shape] = _random_mask(shape, count, seed)
            flat = masks[shape]
            rows, cols = flat // in_features, flat % in_features
        else:
            rows, cols = _stored_indices(indices, name, count, out_features, in_features)
        entries[(layer, module)] = (rows, cols, values.float().contiguous())
    if not entries:
        raise AdapterError("adapter_model.safetensors holds no SHiRA weights")
    return SparseAdapterWeights(key=key, rank=rank, entries=entries)


def _random_mask(shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """peft.tuners.shira.mask_functions.random_mask's entries, in the order PEFT pairs them
    with the values (torch.where over the mask: row-major)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(shape[0] * shape[1], generator=generator)[:count]
    return chosen.sort().values


def _indices_name(weight_name: str) -> str:
    """PEFT's key for a weight's indices: the module path, without the adapter name."""
    return weight_name.split(".shira_weight")[0] + INDICES_SUFFIX


def _stored_indices(
    indices: dict[str, torch.Tensor], name: str, count: int, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    index_name = _indices_name(name)
    pair = indices[index_name]
    if pair.shape != (2, count):
        raise AdapterError(f"{index_name}: expected [2, {count}] indices")
    if pair.dtype.is_floating_point and not torch.equal(pair, pair.round()):
        raise AdapterError(f"{index_name}: indices must be whole numbers")
    rows, cols = pair[0].long(), pair[1].long()
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= out_features or cols.max() >= in_features:
        raise AdapterError(
            f"{index_name}: an index lies outside the {out_features}x{in_features} weight"
        )
    if torch.unique(rows * in_features + cols).numel() != count:
        raise AdapterError(f"{index_name}: an entry is listed twice")
    return rows.contiguous(), cols.contiguous()
