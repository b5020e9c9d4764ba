"""One-time GGUF -> safetensors conversion, cached under $RAGTUNE_HOME/models.

transformers can read a GGUF file but dequantizes it on every load (~40 s here) and cannot
quantize it with bitsandbytes. Converting once to a plain safetensors directory makes later
starts take seconds and lets the loader apply NF4/int8 like for any Hugging Face model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ragtune.fileio import atomic_directory, atomic_write_text, sha256_file
from ragtune.models.assemble import verify_sha256
from ragtune.models.chat import turn_end_token

logger = logging.getLogger(__name__)

MANIFEST = "ragtune_model.json"


def converted_dir_for(gguf_path: Path, cache_root: Path, sha256: str | None = None) -> Path:
    """Cache location keyed by the GGUF content, so a changed file converts again.

    `sha256` is the file's known digest (a bundled model's pinned one), saving a re-hash.
    """
    digest = sha256 or sha256_file(gguf_path)
    return cache_root / f"{gguf_path.stem}-{digest[:12]}"


def read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def convert_gguf(
    gguf_path: Path,
    cache_root: Path,
    sha256: str | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Return a safetensors model dir for `gguf_path`, converting it the first time.

    `sha256`, when given, is the digest the file must have (checked before converting);
    `extra_files` (licence notices) are copied into the directory.
    """
    gguf_path = gguf_path.resolve()
    target = converted_dir_for(gguf_path, cache_root, sha256)
    if read_manifest(target) is not None:
        return target

    if sha256 is not None:
        verify_sha256(gguf_path, sha256)

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
        _stop_at_turn_end(model.generation_config, tokenizer)
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        for path in extra_files:
            shutil.copyfile(path, scratch / path.name)
        bar.update()
        bar.set_postfix_str(steps[3])
        manifest = {
            "source": str(gguf_path),
            "source_sha256": sha256 or sha256_file(gguf_path),
            "fingerprint": weights_fingerprint(scratch),
            "architectures": model.config.architectures,
            "converted_in_s": round(time.monotonic() - started, 1),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(scratch / MANIFEST, json.dumps(manifest, indent=2))
        bar.update()
    return target


def _stop_at_turn_end(generation_config: Any, tokenizer: Any) -> None:
    """Make the end-of-turn token of the prompt format render_chat falls back to (Gemma's
    `<end_of_turn>`) an EOS too: GGUFs without a chat template list only `<eos>`, and a reply
    would otherwise run on past its turn."""
    token = turn_end_token(tokenizer)
    if token is None:
        return
    eos = generation_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id not in eos_ids:
        generation_config.eos_token_id = [*eos_ids, token_id]


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every safetensors file, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()
