"""One-time GGUF -> safetensors conversion, cached under $RAGTUNE_HOME/models.

transformers can read a GGUF file but dequantizes it on every load (~40 s here) and cannot
quantize it with bitsandbytes. Converting once to a plain safetensors directory makes later
starts take seconds and lets the loader apply NF4/int8 like for any Hugging Face model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from ragtune.fileio import atomic_directory, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "ragtune_model.json"


def converted_dir_for(gguf_path: Path, cache_root: Path) -> Path:
    """Cache location keyed by the GGUF content, so a changed file converts again."""
    digest = sha256_file(gguf_path)
    return cache_root / f"{gguf_path.stem}-{digest[:12]}"


def read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """Return a safetensors model dir for `gguf_path`, converting it the first time."""
    gguf_path = gguf_path.resolve()
    target = converted_dir_for(gguf_path, cache_root)
    if read_manifest(target) is not None:
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (first run only)", gguf_path.name, target)
    started = time.monotonic()
    steps = ["tokenizer", "dequantize weights", "write safetensors", "fingerprint"]
    progress = tqdm(steps, desc="Preparing model", unit="step")
    with atomic_directory(target) as scratch, progress as bar:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str(steps[2])
        # The weights are plain tensors now; drop the GGUF quantizer so save_pretrained works,
        # and record the architecture that AutoModel and peer servers need.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        bar.update()
        bar.set_postfix_str(steps[3])
        manifest = {
            "source": str(gguf_path),
            "source_sha256": sha256_file(gguf_path),
            "fingerprint": weights_fingerprint(scratch),
            "architectures": model.config.architectures,
            "converted_in_s": round(time.monotonic() - started, 1),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(scratch / MANIFEST, json.dumps(manifest, indent=2))
        bar.update()
    return target


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every safetensors file, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()
