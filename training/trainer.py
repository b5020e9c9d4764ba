"""`ragtune train`: fine-tune an adapter on prepared data with the Hugging Face Trainer.

The base model comes from `ragtune.models.load_base_model` (the server's loader, so the
fingerprint matches), the text from `render_chat` (the server's template). The result is a
PEFT directory the server loads as is (`adapter_config.json`, `adapter_model.safetensors`)
plus `ragtune_adapter.json`, written to a scratch directory and renamed into place.

Checkpoints go to a hidden sibling `.VERSION.checkpoints/` so an interrupted run can
`--resume` (training/versions.py); under `torchrun` every rank trains and rank 0 alone
writes. The adapter's PEFT config and the model prepared for it: training/peft_model.py.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.config import ModelConfig, default_home
from ragtune.manifest import AdapterManifest
from training.config import TrainConfig
from training.dataset import dataset_hash, read_split
from training.versions import (
    checkpoint_dir_for,
    has_checkpoint,
    resolve_adapter_dir,
    resume_checkpoint,
    write_adapter_version,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM of this address space. `ru_maxrss` is kept across execve, so a process
    started with vfork (Python's subprocess does) reports its parent's RSS when that was
    larger: a 3.1 GiB pytest parent made a 2.6 GiB training run read as 3.1 GiB.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes


def train(
    config: TrainConfig,
    resume: str | None = None,
    home: Path | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train and write the adapter; returns its directory and metrics (on every rank).
    `adapter.r: auto` / `adapter.density: auto` sweep the budget (training/rank_search.py)."""
    if config.adapter.auto:
        from training.rank_search import train_with_search

        return train_with_search(config, home or default_home(), callbacks, resume)
    import torch
    from transformers import Trainer, set_seed

    from ragtune.models import load_base_model
    from training.encoding import PadCollator, encode_rows
    from training.peft_model import adapter_model, adapter_weights_digest

    started = time.monotonic()
    home = home or default_home()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    train_rows = read_split(config.data, "train")
    if not train_rows:
        raise FileNotFoundError(f"no training examples in {config.data / 'train.jsonl'}")
    val_rows = read_split(config.data, "val")
    adapter_dir = resolve_adapter_dir(config, home, resume)
    checkpoint_dir = checkpoint_dir_for(adapter_dir)
    resume_from = resume_checkpoint(resume, checkpoint_dir)
    if adapter_dir.exists():
        raise ValueError(f"{adapter_dir} already exists; adapter versions are immutable")
    if resume_from is None and has_checkpoint(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} holds checkpoints of an interrupted run; "
            "pass --resume to continue it or delete it"
        )

    set_seed(config.seed)
    baseline_rss = peak_rss_bytes()
    mixed = mixed_precision(config)
    loaded = load_base_model(
        ModelConfig(
            source=config.base_model,
            quantization="nf4" if config.method == "qlora" else "none",
            dtype="fp32" if config.dtype == "auto" else config.dtype,
            device=config.device,
            threads=config.threads,
        ),
        home,
    )
    tokenizer = loaded.tokenizer
    train_set = encode_rows(tokenizer, train_rows, config.max_seq_len)
    val_set = encode_rows(tokenizer, val_rows, config.max_seq_len)
    collator = PadCollator(tokenizer.pad_token_id)
    model, selection = adapter_model(loaded.model, config, train_set, collator)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s adapter: %d trainable of %d parameters (%.2f%%)",
        config.method,
        trainable,
        total,
        100 * trainable / total,
    )

    has_val = bool(val_set)
    if not has_val:
        logger.warning("no validation examples: no eval loss, no early stopping")

    on_cpu = loaded.device == "cpu"
    args = _training_arguments(config, checkpoint_dir, has_val, on_cpu, world_size, mixed)
    timer = _step_timer()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=collator,
        callbacks=[*_callbacks(config, has_val, timer), *(callbacks or [])],
    )
    # The starting loss is measured outside train(): as an in-loop evaluation it would set the
    # best metric without a checkpoint, and a run that never beats the base would then keep
    # its last (worst) weights instead of its best checkpoint.
    initial_eval = trainer.evaluate() if has_val and resume_from is None else {}
    output = trainer.train(resume_from_checkpoint=resume_from)
    eval_history = [
        {"step": entry["step"], "eval_loss": round(entry["eval_loss"], 4)}
        for entry in trainer.state.log_history
        if "eval_loss" in entry
    ]
    final_eval = trainer.evaluate() if has_val else {}  # the best checkpoint's, once loaded

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    digest = adapter_weights_digest(peft_model)
    peak = peak_rss_bytes()
    digests, peaks = [digest], [peak]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (digest, peak))
        digests = [item[0] for item in gathered]
        peaks = [item[1] for item in gathered]

    metrics: dict[str, Any] = {
        "train_loss": round(output.training_loss, 4),
        "eval_loss": round(final_eval["eval_loss"], 4) if has_val else None,
        "initial_eval_loss": round(initial_eval["eval_loss"], 4) if initial_eval else None,
        "eval_history": eval_history,
        "global_step": trainer.state.global_step,
        "max_steps": config.max_steps,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_examples": len(train_set),
        "val_examples": len(val_set),
        "trainable_params": trainable,
        "total_params": total,
        "step_time_s": timer.mean,
        "duration_s": round(time.monotonic() - started, 1),
        "peak_rss_bytes": max(peaks),
        "peak_rss_above_start_bytes": peak - baseline_rss,
        "world_size": world_size,
        "rank_weight_digests": digests,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "device": loaded.device,
        "base_quantization": loaded.quantization,
        "mixed_precision_bf16": mixed,
        "estimated_memory_bytes": _estimate_for(config, loaded.model_dir, loaded.device),
    }
    if selection is not None:
        metrics["sparse_selection"] = selection.record
    if trainer.is_world_process_zero():
        manifest = AdapterManifest(
            name=config.name,
            version=adapter_dir.name,
            base_model_fingerprint=loaded.fingerprint,
            method=config.method,
            rank=config.adapter.r,
            target_modules=list(config.adapter.target_modules),
            data_hash=dataset_hash(config.data),
            metrics=metrics,
            config=config.model_dump(mode="json"),
        )
        write_adapter_version(adapter_dir, peft_model, manifest)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        logger.info("adapter written to %s (eval_loss=%s)", adapter_dir, metrics["eval_loss"])
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir, metrics=metrics, is_main_process=trainer.is_world_process_zero()
    )


def _training_arguments(
    config: TrainConfig,
    checkpoint_dir: Path,
    has_val: bool,
    on_cpu: bool,
    world_size: int,
    mixed: bool,
) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        use_cpu=on_cpu,
        bf16=mixed,  # autocast: fp32 weights, bf16 matmuls (on CPUs too, with use_cpu)
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_backend="gloo" if on_cpu and world_size > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # eval needs the loss only; keeping logits costs GBs
        disable_tqdm=not config.progress,
    )


def _callbacks(config: TrainConfig, has_val: bool, timer: Any) -> list[Any]:
    from transformers import EarlyStoppingCallback

    callbacks = [timer]
    if has_val and config.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=config.early_stopping_patience,
                early_stopping_threshold=config.early_stopping_threshold,
            )
        )
    return callbacks


def mixed_precision(config: TrainConfig) -> bool:
    """Whether to train with bf16 autocast over fp32 weights: dtype bf16 on a GPU, or auto
    on a device with native bf16 (on an AMX Xeon a SmolLM2 LoRA step of 4 x 448 tokens
    runs several times faster; on AVX2-only CPUs bf16 GEMMs crawl, so auto stays fp32)."""
    import torch

    from ragtune.hardware import compute_dtype_name

    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.dtype == "bf16":
        return cuda
    return (
        config.dtype == "auto" and compute_dtype_name("auto", "cuda" if cuda else "cpu") == "bf16"
    )


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time per optimizer step, the first (warm-up) step excluded."""

        def __init__(self) -> None:
            self.durations: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.durations.append(time.perf_counter() - self._started)

        @property
        def mean(self) -> float | None:
            steady = self.durations[1:] or self.durations
            return round(sum(steady) / len(steady), 4) if steady else None

    return StepTimer()


def _estimate_for(config: TrainConfig, model_dir: Path, device: str) -> int | None:
    """The estimator's figure for this very run, recorded beside the measured peak."""
    try:
        from training.memory import estimate, shape_for
    except ImportError:
        return None
    shape = shape_for(model=str(model_dir))
    method = "qlora" if config.method == "qlora" else "lora"
    compute = config.dtype if config.dtype != "auto" else "fp32"
    result = estimate(
        shape,
        method=method,
        seq_len=config.max_seq_len,
        batch=config.batch_size,
        dtype="bf16" if mixed_precision(config) else compute,
        lora_rank=config.adapter.r,
        gradient_checkpointing=config.gradient_checkpointing,
        target_modules=config.adapter.target_modules,
        device="cpu" if device == "cpu" else "cuda",
    )
    return result.total_bytes
