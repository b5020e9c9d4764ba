"""Random-weight PEFT LoRA adapters for the bundled base model, for tests and benchmarks.

Made with PEFT itself (so the files are exactly what users bring); `init_lora_weights=False`
gives non-zero B, so each adapter visibly changes the output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ragtune.config import default_home
from ragtune.manifest import AdapterManifest
from ragtune.models import resolve_model_dir
from ragtune.models.loader import model_fingerprint

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS = ATTENTION + MLP


def random_peft_model(
    rank: int, targets: list[str], seed: int, scale: float = 0.3, source: str = "bundled"
):
    """A bundled base (`source`, fp32) wrapped by PEFT with random LoRA factors (B scaled by
    `scale`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(source, default_home()), dtype=torch.float32
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=rank * 2,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    return model


def make_adapter(
    out: Path,
    rank: int,
    targets: list[str],
    seed: int,
    scale: float = 0.3,
    manifest_version: str | None = None,
    fingerprint: str | None = None,
    source: str = "bundled",
) -> Path:
    model = random_peft_model(rank, targets, seed, scale, source)
    model.save_pretrained(out, safe_serialization=True)
    if manifest_version is not None:
        model_dir = resolve_model_dir("bundled", default_home())
        AdapterManifest(
            name=out.name,
            version=manifest_version,
            base_model_fingerprint=fingerprint or model_fingerprint(model_dir, default_home()),
            method="lora",
            rank=rank,
            target_modules=targets,
        ).write(out)
    return out
