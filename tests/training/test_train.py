"""`ragtune train` on the real bundled model: LoRA, QLoRA and SHiRA for a few steps on tiny
data and short sequences, the adapter directory the server loads, early stopping, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.config import default_home
from ragtune.manifest import AdapterManifest
from training.config import TrainConfig
from training.dataset import dataset_hash

ROWS = [
    ("How many vacation days do Orvane employees get?", "27 vacation days per year."),
    ("Where do I book a business trip?", "At the Compass travel desk."),
    ("Which app is used for MFA?", "The Keystone authenticator app."),
    ("Where is the fire assembly point?", "Assembly point Gate C."),
]
VAL = [("How long is the return window?", "21 days from delivery.")]


@pytest.fixture(scope="module")
def base_dir() -> Path:
    """The bundled model, converted once into the shared cache (tests use their own home)."""
    from ragtune.models import resolve_model_dir

    return resolve_model_dir("bundled", default_home())


def write_chat_data(data: Path, train: list, val: list) -> Path:
    """train.jsonl / val.jsonl of (question, answer) pairs, as `ragtune prepare` writes."""
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (data / name).write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": a},
                        ]
                    }
                )
                + "\n"
                for q, a in rows
            ),
            encoding="utf-8",
        )
    return data


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_chat_data(tmp_path / "data", ROWS, VAL)


def tiny_config(base_dir: Path, data_dir: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "name": "t",
        "base_model": str(base_dir),
        "data": data_dir,
        "max_steps": 2,
        "batch_size": 1,
        "max_seq_len": 48,
        "eval_steps": 2,
        "warmup_steps": 0,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "progress": False,
        "threads": 2,
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _reload_and_check(adapter_dir: Path, base_dir: Path) -> None:
    """Load the adapter exactly as a PEFT consumer would: no conversion step; it changes the
    base model's output, so the trained weights really are in the file."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 2]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def _check_adapter_dir(adapter_dir: Path, config: TrainConfig, base_dir: Path) -> AdapterManifest:
    from ragtune.models.loader import model_fingerprint

    files = {path.name for path in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "ragtune_adapter.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    manifest = AdapterManifest.read(adapter_dir)
    assert manifest is not None
    assert manifest.name == config.name and manifest.method == config.method
    assert manifest.base_model_fingerprint == model_fingerprint(base_dir, default_home())
    assert manifest.rank == 4 and manifest.target_modules == ["q_proj", "v_proj"]
    assert manifest.data_hash == dataset_hash(config.data)
    assert manifest.config["max_steps"] == config.max_steps
    metrics = manifest.metrics
    assert metrics["global_step"] == config.max_steps
    assert metrics["eval_loss"] > 0 and metrics["initial_eval_loss"] > 0
    assert metrics["duration_s"] > 0 and metrics["peak_rss_bytes"] > 500 * 2**20
    assert metrics["estimated_memory_bytes"] > 0 and metrics["train_examples"] == len(ROWS)
    assert not list(adapter_dir.parent.glob(".*"))  # scratch and checkpoints cleaned up
    return manifest


def test_lora_default_versioned_output(base_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from training.trainer import train

    config = tiny_config(base_dir, data_dir)
    result = train(config, home=tmp_path / "home")
    assert result.adapter_dir == tmp_path / "home" / "adapters" / "t" / "v1"
    manifest = _check_adapter_dir(result.adapter_dir, config, base_dir)
    assert manifest.version == "v1"
    assert manifest.metrics["base_quantization"] == "none"
    assert manifest.metrics["eval_loss"] < manifest.metrics["initial_eval_loss"]
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    _reload_and_check(result.adapter_dir, base_dir)
    # the next run gets the next version; existing versions are never overwritten
    from training.versions import resolve_adapter_dir

    assert resolve_adapter_dir(config, tmp_path / "home", None).name == "v2"
    with pytest.raises(ValueError, match="immutable"):
        train(tiny_config(base_dir, data_dir, version="v1"), home=tmp_path / "home")


def test_auto_dtype_trains_in_bf16_autocast_where_the_cpu_has_native_bf16(
    base_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """dtype auto: fp32 weights and bf16 autocast (mixed precision) on a CPU with native bf16
    (AMX, AVX-512 BF16; ~2x faster steps on the bundled model), plain fp32 where bf16 GEMMs
    are slow; either way a float32 adapter that changes the model."""
    from safetensors import safe_open

    from ragtune.hardware import detect
    from training.trainer import mixed_precision, train

    config = tiny_config(base_dir, data_dir, dtype="auto")
    assert mixed_precision(config) == detect().native_bf16
    assert not mixed_precision(tiny_config(base_dir, data_dir))  # fp32 stays fp32
    result = train(config, home=tmp_path / "home")
    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest.metrics["mixed_precision_bf16"] == detect().native_bf16
    assert manifest.metrics["eval_loss"] > 0
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as weights:
        dtypes = {str(weights.get_tensor(k).dtype) for k in weights.keys()}  # noqa: SIM118
    assert dtypes == {"torch.float32"}
    _reload_and_check(result.adapter_dir, base_dir)


def test_qlora_trains_on_an_nf4_base(base_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from training.trainer import train

    config = tiny_config(base_dir, data_dir, method="qlora", output=tmp_path / "q")
    result = train(config, home=tmp_path)
    manifest = _check_adapter_dir(result.adapter_dir, config, base_dir)
    assert manifest.metrics["base_quantization"] == "nf4"
    _reload_and_check(result.adapter_dir, base_dir)


def test_sparse_shira_adapter(base_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from training.trainer import train

    config = tiny_config(base_dir, data_dir, method="sparse", output=tmp_path / "s")
    result = train(config, home=tmp_path)
    manifest = _check_adapter_dir(result.adapter_dir, config, base_dir)
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "SHIRA"
    # SHiRA trains r * (in + out) entries per matrix, like LoRA of rank r
    assert manifest.metrics["trainable_params"] == 30 * 4 * ((576 + 576) + (576 + 192))
    _reload_and_check(result.adapter_dir, base_dir)


def test_early_stopping_ends_a_diverging_run(
    base_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from training.trainer import train

    config = tiny_config(
        base_dir,
        data_dir,
        max_steps=8,
        eval_steps=1,
        learning_rate=3.0,
        lr_scheduler="constant",
        early_stopping_patience=1,
        output=tmp_path / "e",
    )
    result = train(config, home=tmp_path)
    metrics = result.metrics
    assert metrics["stopped_early"] and metrics["global_step"] < 8
    losses = [entry["eval_loss"] for entry in metrics["eval_history"]]
    assert len(losses) == metrics["global_step"]  # one evaluation per step
    assert losses[-1] >= min(losses)  # it stopped because the last one did not improve
    # the best checkpoint, not the last step, is what gets saved and reported
    assert metrics["eval_loss"] == pytest.approx(min(losses), abs=1e-3)


@pytest.mark.slow  # ~12 s; ragtune retrain's resume stays in make test (test_retrain.py)
def test_resume_after_interruption_matches_an_uninterrupted_run(
    base_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from transformers import TrainerCallback

    from training.trainer import train
    from training.versions import checkpoint_dir_for

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")

    (data_dir / "val.jsonl").unlink()  # no evaluations: this test is about checkpoints
    home = tmp_path / "home"
    settings = {"max_steps": 3, "eval_steps": 1, "name": "r", "early_stopping_patience": None}
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(base_dir, data_dir, **settings), home=home, callbacks=[Interrupt()])
    adapter_dir = home / "adapters" / "r" / "v1"
    assert not adapter_dir.exists()  # nothing half-written
    assert (checkpoint_dir_for(adapter_dir) / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(base_dir, data_dir, version="v1", **settings), home=home)

    resumed = train(tiny_config(base_dir, data_dir, **settings), resume="latest", home=home)
    assert resumed.adapter_dir == adapter_dir
    assert resumed.metrics["resumed_from"] == "checkpoint-2"
    assert resumed.metrics["global_step"] == 3

    straight = train(tiny_config(base_dir, data_dir, **settings), home=tmp_path / "other")
    assert resumed.metrics["rank_weight_digests"] == straight.metrics["rank_weight_digests"]


@pytest.mark.slow  # ~13 s
def test_group_by_length_batches_short_examples_apart_from_long_ones(
    base_dir: Path, tmp_path: Path
) -> None:
    """group_by_length: the batches the trainer draws hold examples of similar length, so a
    mix of short closed-book questions and long RAG prompts pads less (what makes the bench's
    knowledge adapter train ~2x more examples in its time budget); the run still trains."""
    from transformers import TrainerCallback

    from training.trainer import train

    long_answer = " ".join(["The Ledgerly portal takes expense claims within thirty days."] * 4)
    # 64 rows: transformers groups within megabatches of min(rows // (4 * batch), 50) batches
    rows = [(f"Question {i}?", "Yes." if i % 2 else long_answer) for i in range(64)]
    data = write_chat_data(tmp_path / "mixed", rows, VAL)

    class PaddingSeen(TrainerCallback):
        padded = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for batch in kwargs["train_dataloader"]:
                mask = batch["attention_mask"]
                PaddingSeen.padded += int(mask.numel() - mask.sum())

    padding = {}
    for grouped in (False, True):
        PaddingSeen.padded = 0
        config = tiny_config(
            base_dir,
            data,
            name=f"g{int(grouped)}",
            group_by_length=grouped,
            batch_size=2,
            max_steps=2,
            max_seq_len=128,
        )
        result = train(config, home=tmp_path / "home", callbacks=[PaddingSeen()])
        assert result.metrics["global_step"] == 2
        padding[grouped] = PaddingSeen.padded
    # random pairs of a short and a long example pad by the difference; grouped ones barely
    assert padding[True] < padding[False] / 4
