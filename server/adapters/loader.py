"""Read a PEFT LoRA directory into batched-LoRA factors, refusing anything the server cannot
serve exactly: every problem is an AdapterError with a message that says the fix."""

from __future__ import annotations

import json
import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ragtune.manifest import MANIFEST_NAME, AdapterManifest
from server.adapters.errors import AdapterError
from server.adapters.sparse_reader import read_shira
from server.engine.lora import AdapterWeights
from server.engine.sparse import SparseAdapterWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


@dataclass
class BaseSpec:
    """What an adapter must match to be served on this base model."""

    fingerprint: str
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # module -> (in, out)
    max_rank: int
    dtype: torch.dtype
    supports_lora: bool = True


@dataclass
class LoadedAdapter:
    weights: AdapterWeights | SparseAdapterWeights
    version: str
    path: Path
    rank: int
    alpha: float
    target_modules: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    # (size, mtime_ns, inode) of each file read, taken before reading: a version is immutable,
    # so a reload after eviction refuses files that changed since the first load.
    files: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def file_signature(path: Path) -> dict[str, tuple[int, int, int]]:
    signature = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_NAME):
        try:
            st = (path / name).stat()
        except FileNotFoundError:
            continue
        signature[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return signature


def read_adapter(
    path: Path, name: str, version: str | None, spec: BaseSpec, load_id: int
) -> LoadedAdapter:
    if not spec.supports_lora:
        raise AdapterError(
            "this base model runs on the fallback runner, which serves no adapters",
            param="lora_name",
        )
    files = file_signature(path)
    config = _read_config(path)
    manifest = _read_manifest(path, spec)
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{CONFIG_FILE}: r={rank!r} is not a valid rank")
    targets = _targets(config, spec)
    final_version = version or (manifest.version if manifest else None) or "v1"
    key = f"{name}@{final_version}#{load_id}"
    if config["peft_type"] == "SHIRA":  # r sets the entry budget, not a slot width
        sparse = read_shira(config, spec, load_tensors(path), key)
        return LoadedAdapter(
            weights=sparse,
            version=final_version,
            path=path,
            rank=rank,
            alpha=1.0,
            target_modules=sorted(sparse.target_modules),
            manifest=manifest.model_dump() if manifest else {},
            files=files,
        )
    if rank > spec.max_rank:
        raise AdapterError(
            f"rank {rank} exceeds engine.max_lora_rank {spec.max_rank}; raise it in the server "
            f"config or retrain with r <= {spec.max_rank}"
        )
    alpha = _number(config.get("lora_alpha", rank), "lora_alpha")
    factors = _read_factors(path, config, spec, rank, alpha)
    # rank_pattern gives modules their own ranks; the slots need one rank per adapter, so
    # smaller factors are zero-padded to the largest (B @ A is unchanged).
    rank = max(a.shape[0] for a, _ in factors.values())
    factors = _pack({k: _pad(a, b, rank) for k, (a, b) in factors.items()}, spec.dtype)
    del targets  # the weights say which modules are adapted
    return LoadedAdapter(
        weights=AdapterWeights(key=key, rank=rank, factors=factors),
        version=final_version,
        path=path,
        rank=rank,
        alpha=alpha,
        target_modules=sorted({m for _, m in factors}),
        manifest=manifest.model_dump() if manifest else {},
        files=files,
    )


def _targets(config: dict[str, Any], spec: BaseSpec) -> list[str]:
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must be a list of module names")
    unknown = sorted(t for t in targets if t not in spec.module_shapes)
    if unknown:
        raise AdapterError(
            f"target modules {unknown} do not exist in the base model or cannot be batched; "
            f"supported: {list(spec.module_shapes)}"
        )
    return targets


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AdapterError(f"{CONFIG_FILE}: {what}={value!r} must be a positive number")
    return float(value)


def _pack(
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Copy all factors into views of one anonymous memory map. Hundreds of small tensors per
    adapter would come from malloc's heaps, which keep freed memory, so the server's RSS would
    not come down after unloads; a map is returned to the OS as soon as its last view is gone
    (unload, eviction, or the last request using it finishing)."""
    total = sum(a.numel() + b.numel() for a, b in factors.values())
    itemsize = torch.empty((), dtype=dtype).element_size()
    flat = torch.frombuffer(mmap.mmap(-1, total * itemsize), dtype=dtype, count=total)
    packed, offset = {}, 0
    for key, pair in factors.items():
        views = []
        for tensor in pair:
            view = flat[offset : offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            views.append(view)
            offset += tensor.numel()
        packed[key] = (views[0], views[1])
    return packed


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return (
        torch.cat([a, a.new_zeros(extra, a.shape[1])]).contiguous(),
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1).contiguous(),
    )


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{CONFIG_FILE} is missing in {path}; is this a PEFT adapter?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is corrupted: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "SHIRA"):
        raise AdapterError(
            f"peft_type {peft_type} cannot be served: LoRA and SHiRA (sparse) adapters are "
            "batched; merge this one into the base, or retrain with --method lora|sparse"
        )
    config["peft_type"] = peft_type
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out")
    if problems:
        raise AdapterError("unsupported adapter features: " + ", ".join(problems))
    return config


def _read_manifest(path: Path, spec: BaseSpec) -> AdapterManifest | None:
    try:
        manifest = AdapterManifest.read(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        raise AdapterError(f"ragtune_adapter.json is corrupted: {exc}") from None
    if manifest and manifest.base_model_fingerprint != spec.fingerprint:
        raise AdapterError(
            f"adapter was trained on base model {manifest.base_model_fingerprint[:12]}…, "
            f"this server runs {spec.fingerprint[:12]}…: wrong base model"
        )
    return manifest


def _read_factors(
    path: Path, config: dict[str, Any], spec: BaseSpec, rank: int, alpha: float
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_tensors(path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    key_paths: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise AdapterError(f"weight {key!r} targets a module this server cannot adapt")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in spec.module_shapes:
            raise AdapterError(f"weight {key!r}: the base model has no module {module!r}")
        if layer >= spec.num_layers:
            raise AdapterError(f"weight {key!r}: the base model has {spec.num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = tensor
        # PEFT module path for rank/alpha patterns, e.g. model.layers.0.self_attn.q_proj
        key_paths[(layer, module)] = key.split(".lora_")[0].removeprefix("base_model.model.")
    if not pairs:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    rank_pattern = _pattern(config, "rank_pattern")
    alpha_pattern = _pattern(config, "alpha_pattern")
    factors = {}
    for (layer, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        in_features, out_features = spec.module_shapes[module]
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r) or r > spec.max_rank:
            raise AdapterError(
                f"layer {layer} {module}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not "
                f"fit the base ({in_features} -> {out_features}, rank <= {spec.max_rank}): "
                "trained for a different base model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"layer {layer} {module}: weights contain NaN or Inf")
        module_path = key_paths[(layer, module)]
        r_cfg = _pattern_value(rank_pattern, module_path, rank)
        a_cfg = _pattern_value(alpha_pattern, module_path, alpha)
        if r_cfg != r:
            raise AdapterError(
                f"layer {layer} {module}: {CONFIG_FILE} gives rank {r_cfg:g} but the weights "
                f"have rank {r}; the config does not belong to these weights"
            )
        scale = a_cfg / math.sqrt(r_cfg) if config.get("use_rslora") else a_cfg / r_cfg
        scaled = (b.float() * scale).to(spec.dtype).contiguous()
        if not torch.isfinite(scaled).all():
            raise AdapterError(
                f"layer {layer} {module}: lora_alpha/r = {scale:g} overflows the weights "
                f"in {spec.dtype}; check lora_alpha in {CONFIG_FILE}"
            )
        factors[(layer, module)] = (a.to(spec.dtype).contiguous(), scaled)
    return factors


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's safetensors file (never a pickle)."""
    file_name = WEIGHTS_FILE
    weights_path = path / file_name
    if not weights_path.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise AdapterError(
                "weights are pickled (.bin/.pt), which this server never loads; save them as "
                "adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{file_name} is missing in {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{file_name} is corrupted: {exc}") from None


def _pattern(config: dict[str, Any], what: str) -> dict[re.Pattern[str], float]:
    """PEFT rank/alpha patterns: module-path regexes -> value (checked here, not at use)."""
    pattern = config.get(what) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{CONFIG_FILE}: {what} must be an object")
    compiled = {}
    for key, value in pattern.items():
        try:
            compiled[re.compile(rf"(.*\.)?({key})$")] = _number(value, f"{what}[{key!r}]")
        except re.error as exc:
            raise AdapterError(f"{CONFIG_FILE}: {what} key {key!r} is not a regex: {exc}") from None
    return compiled


def _pattern_value(
    pattern: dict[re.Pattern[str], float], module_path: str, default: float
) -> float:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key matching the end of the
    module path."""
    for regex, value in pattern.items():
        if regex.match(module_path):
            return value
    return float(default)
