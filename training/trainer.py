"""`ragtune train`: fine-tune an adapter on prepared data with the Hugging Face Trainer.

The base model comes from `ragtune.models.load_base_model` (the server's loader, so the
fingerprint matches), the text from `render_chat` (the server's template). The result is a
PEFT directory the server loads as is (`adapter_config.json`, `adapter_model.safetensors`)
plus `ragtune_adapter.json`, written to a scratch directory and renamed into place.

Checkpoints go to a hidden sibling `.VERSION.checkpoints/` so an interrupted run can
`--resume`; under `torchrun` every rank trains and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.config import ModelConfig, default_home
from ragtune.fileio import atomic_directory
from ragtune.manifest import AdapterManifest
from training.config import TrainConfig
from training.dataset import dataset_hash, read_split

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d+)$")


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


def checkpoint_dir_for(adapter_dir: Path) -> Path:
    """Hidden sibling: servers skip dot-directories, like atomic_directory's scratch."""
    return adapter_dir.parent / f".{adapter_dir.name}.checkpoints"


def _has_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("checkpoint-*"))


def resolve_adapter_dir(config: TrainConfig, home: Path, resume: str | None) -> Path:
    """Explicit --output, else ADAPTERS/NAME/VERSION with the next free vN (or, for
    `--resume` without a version, the newest unfinished run)."""
    if config.output is not None:
        return config.output
    root = home / "adapters" / config.name
    if config.version:
        return root / config.version
    numbers: dict[int, Path] = {}
    if root.is_dir():
        for child in root.iterdir():
            name = child.name.removeprefix(".").removesuffix(".checkpoints")
            match = _VERSION.match(name)
            if match:
                numbers[int(match.group(1))] = root / name
    if resume == "latest":
        unfinished = [
            n
            for n, path in numbers.items()
            if not path.exists() and _has_checkpoint(checkpoint_dir_for(path))
        ]
        if not unfinished:
            raise ValueError(f"--resume: no interrupted run of {config.name!r} under {root}")
        return numbers[max(unfinished)]
    return root / f"v{max(numbers, default=0) + 1}"


def _resume_checkpoint(resume: str | None, checkpoint_dir: Path) -> str | None:
    if resume is None:
        return None
    if resume != "latest":
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"--resume checkpoint not found: {resume}")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if last is None:
        raise ValueError(f"--resume: no checkpoint in {checkpoint_dir}")
    return last


def peft_config(config: TrainConfig, mask_fn: Any = None) -> Any:
    """LoRA for lora/qlora; SHiRA (sparse high-rank adapter) for sparse: PEFT's seeded random
    mask, or `mask_fn` (training/sparse_selection.py), recorded as `mask_type` =
    adapter.selection with no seed (PEFT saves the chosen entries; none can be redrawn)."""
    settings = config.adapter
    if config.method == "sparse":
        import warnings

        from peft import ShiraConfig

        chosen = mask_fn is not None
        with warnings.catch_warnings():  # PEFT warns that a custom mask_type needs a mask_fn
            warnings.simplefilter("ignore", UserWarning)
            shira = ShiraConfig(
                r=settings.r,
                target_modules=list(settings.target_modules),
                mask_type=settings.selection if chosen else "random",
                random_seed=None if chosen else config.seed,
                task_type="CAUSAL_LM",
            )
        if chosen:
            shira.mask_fn = mask_fn
        return shira
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_weights_digest(model: Any) -> str:
    """sha256 over the adapter's tensors: equal digests = identical adapters (DDP check)."""
    from peft import get_peft_model_state_dict

    return state_digest(get_peft_model_state_dict(model))


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over named tensors in key order (the keys PEFT writes to the safetensors)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


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
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed

    from ragtune.models import load_base_model
    from training.encoding import PadCollator, encode_rows
    from training.targets import resolve_target_modules

    started = time.monotonic()
    home = home or default_home()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    train_rows = read_split(config.data, "train")
    if not train_rows:
        raise FileNotFoundError(f"no training examples in {config.data / 'train.jsonl'}")
    val_rows = read_split(config.data, "val")
    adapter_dir = resolve_adapter_dir(config, home, resume)
    checkpoint_dir = checkpoint_dir_for(adapter_dir)
    resume_from = _resume_checkpoint(resume, checkpoint_dir)
    if adapter_dir.exists():
        raise ValueError(f"{adapter_dir} already exists; adapter versions are immutable")
    if resume_from is None and _has_checkpoint(checkpoint_dir):
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
    model = loaded.model
    model.config.use_cache = False
    config.adapter.target_modules = resolve_target_modules(model, config.adapter.target_modules)
    if config.method == "qlora":
        _disable_cpu_weight_packing(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()
    tokenizer = loaded.tokenizer
    train_set = encode_rows(tokenizer, train_rows, config.max_seq_len)
    val_set = encode_rows(tokenizer, val_rows, config.max_seq_len)
    collator = PadCollator(tokenizer.pad_token_id)
    selection = None
    if config.method == "sparse":
        from training.sparse_selection import calibration_batches, select

        selection = select(
            model,
            config.adapter,
            lambda: calibration_batches(
                train_set,
                collator,
                config.batch_size,
                config.adapter.calibration_batches,
                config.seed,
            ),
        )
        config.adapter.r = selection.r
    model = get_peft_model(model, peft_config(config, selection and selection.mask_fn))
    if selection is not None:  # the masks are built: free the scores the function holds
        model.peft_config["default"].mask_fn = None
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
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
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


def write_adapter_version(adapter_dir: Path, peft_model: Any, manifest: AdapterManifest) -> None:
    """Write a finished adapter version: PEFT's files and the manifest go to a scratch
    directory that is renamed into place only once complete, so a crash (or kill -9) never
    leaves a half-written version under its name."""
    with atomic_directory(adapter_dir) as scratch:
        peft_model.save_pretrained(str(scratch), safe_serialization=True)
        if not (scratch / "adapter_model.safetensors").is_file() or any(scratch.glob("*.bin")):
            raise RuntimeError("PEFT did not write adapter_model.safetensors")
        manifest.write(scratch)


def _disable_cpu_weight_packing(model: Any) -> None:
    """bitsandbytes repacks NF4 weights for its fast CPU inference kernel the first time a
    Linear4bit runs without grad (our evaluation); training through a repacked weight then
    yields zero gradients and garbage losses (bitsandbytes 0.50, AVX512-BF16 CPUs). Keep the
    trainable layout: the repacking only speeds up inference, which the server does."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
