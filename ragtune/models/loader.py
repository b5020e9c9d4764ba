"""Load the base model with the configured quantization, dtype and device.

One function for the server and for training, so both see the same weights, tokenizer and
fingerprint (the fingerprint is what adapters record and the server checks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.config import ModelConfig, bundled_model_name
from ragtune.cpu_share import resolve_threads
from ragtune.fileio import atomic_write_text
from ragtune.hardware import compute_dtype_name, detect, slow_setting_warning
from ragtune.models.bundled import BUNDLED_LLMS, bundled_llm_gguf, licence_files
from ragtune.models.convert import (
    convert_gguf,
    converted_dir_for,
    read_manifest,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    model_dir: Path
    fingerprint: str
    device: str
    dtype: Any  # torch.dtype used for compute
    quantization: str  # model.quantization, or "unloaded": no projections (skeleton.py)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def bundled_model_dir(name: str, home: Path) -> Path:
    """A bundled model's converted directory; the GGUF is located (or assembled) and
    converted only while that directory is missing."""
    llm = BUNDLED_LLMS[name]
    cache = home / "models"
    converted = converted_dir_for(Path(llm.gguf), cache, llm.sha256)
    if read_manifest(converted) is not None:
        return converted
    gguf = bundled_llm_gguf(name, home)
    return convert_gguf(gguf, cache, sha256=llm.sha256, extra_files=licence_files(llm))


def resolve_model_dir(source: str, home: Path) -> Path:
    """Turn the configured `model.source` into a local safetensors model directory."""
    cache = home / "models"
    name = bundled_model_name(source)  # ValueError for an unknown `bundled:<name>`
    if name is not None:
        return bundled_model_dir(name, home)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model.source {source!r} is neither 'bundled[:<name>]', a .gguf file, nor a Hugging "
        "Face model directory containing config.json"
    )


def model_fingerprint(model_dir: Path, home: Path) -> str:
    """The converted model's manifest holds it; other dirs are hashed once and cached."""
    manifest = read_manifest(model_dir)
    if manifest and manifest.get("fingerprint"):
        return manifest["fingerprint"]
    stamp = [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(model_dir.glob("*"))
        if p.is_file()
    ]
    import hashlib

    key = hashlib.sha256(json.dumps([str(model_dir.resolve()), stamp]).encode()).hexdigest()
    cached = home / "fingerprints" / f"{key[:32]}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    fingerprint = weights_fingerprint(model_dir)
    atomic_write_text(cached, fingerprint)
    return fingerprint


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but torch sees no CUDA device")
    return device


def compute_dtype(config: ModelConfig, device: str, caps: Any = None) -> Any:
    """The torch dtype `model.dtype` resolves to on `device` (hardware.compute_dtype_name)."""
    import torch

    bf16 = compute_dtype_name(config.dtype, device, caps) == "bf16"
    return torch.bfloat16 if bf16 else torch.float32


def load_base_model(
    config: ModelConfig, home: Path, *, packs_projections: bool = False
) -> LoadedModel:
    """`packs_projections`: the caller packs the decoder projections from the checkpoint
    itself (the compact engine's packed kinds); on a CPU they are then not loaded at all
    (skeleton.py: quantization "unloaded"), else the whole model loads as configured."""
    import torch

    threads = resolve_threads(config.threads)
    if threads:
        torch.set_num_threads(threads)
    model_dir = resolve_model_dir(config.source, home)
    device = pick_device(config.device)
    caps = detect()
    dtype_name = compute_dtype_name(config.dtype, device, caps)
    warning = slow_setting_warning(dtype_name, device, caps)
    if warning:
        logger.warning(warning)
    dtype = compute_dtype(config, device, caps)
    described = (
        f"dtype={dtype_name}{' (auto)' if config.dtype == 'auto' else ''}, device={device}; "
        f"{caps.describe()}"
    )
    model, quantization = None, config.quantization
    if packs_projections:
        from ragtune.models.skeleton import load_without_projections

        model, why_not = load_without_projections(model_dir, dtype, device)
        if model is None:
            logger.info("loading the whole model (projections included): %s", why_not)
        else:
            quantization = "unloaded"
            logger.info(
                "loaded %s without its decoder projections (the engine packs them from the "
                "checkpoint, so model.quantization=%s has nothing to quantize), %s",
                model_dir,
                config.quantization,
                described,
            )
    if model is None:
        logger.info("loading %s (quantization=%s, %s)", model_dir, quantization, described)
        model = load_whole_model(model_dir, quantization, dtype, device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        fingerprint=model_fingerprint(model_dir, home),
        device=device,
        dtype=dtype,
        quantization=quantization,
    )


def load_whole_model(model_dir: Path, quantization: str, dtype: Any, device: str) -> Any:
    """The Hugging Face model with every weight, bitsandbytes-quantized as configured."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    return model
