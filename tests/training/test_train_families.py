"""`ragtune train` on every model family the server batches: the default target modules
(Llama's names) resolve to the family's own (Phi-3's fused qkv_proj / gate_up_proj), the
adapter trains for a few steps, and the server's reader takes it onto the family's compact
forward, where it changes the logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragtune.config import EngineConfig
from ragtune.manifest import AdapterManifest
from ragtune.models import LoadedModel
from ragtune.models.loader import model_fingerprint
from server.adapters.loader import BaseSpec, read_adapter
from server.engine.runner import CompactRunner
from tests.engine.families import FAMILY_NAMES, FAST_FAMILIES, save_model_dir
from tests.engine.test_runner import sequence
from tests.training.test_train import data_dir  # noqa: F401 - fixture
from training.config import TrainConfig
from training.trainer import train


@pytest.mark.parametrize(
    "family",
    [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_NAMES],
)
def test_default_targets_train_an_adapter_the_server_serves(
    family: str,
    data_dir: Path,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    model, _ = save_model_dir(family, tmp_path / "model")
    config = TrainConfig.model_validate(
        {
            "name": family,
            "base_model": str(tmp_path / "model"),
            "data": data_dir,
            "max_steps": 2,
            "batch_size": 2,
            "max_seq_len": 48,
            "eval_steps": 2,
            "warmup_steps": 0,
            "learning_rate": 5e-2,
            "progress": False,
            "threads": 2,
            "adapter": {"r": 4, "alpha": 8},
        }
    )
    result = train(config, home=tmp_path / "home")
    expected = (
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        if family == "phi3"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert AdapterManifest.read(result.adapter_dir).target_modules == expected
    fingerprint = model_fingerprint(tmp_path / "model", tmp_path / "home")
    loaded = LoadedModel(model, None, None, fingerprint, "cpu", torch.float32, "none")
    runner = CompactRunner(loaded, EngineConfig(max_loras=1, max_lora_rank=8, weights="dense"), 64)
    spec = BaseSpec(fingerprint, 2, runner.module_shapes, 8, torch.float32)
    adapter = read_adapter(result.adapter_dir, family, None, spec, 0).weights
    assert adapter.target_modules == set(expected)
    prompt = [5, 9, 2, 77, 4, 19]
    base, tuned = sequence(prompt), sequence(prompt, adapter)
    for seq in (base, tuned):
        runner.add(seq)
    [base_logits, tuned_logits] = [runner.prefill([seq])[0] for seq in (base, tuned)]
    assert not torch.allclose(base_logits, tuned_logits)
