"""The PEFT side of a training run: the adapter's config (LoRA for lora/qlora, SHiRA for
sparse), the base model prepared for it (qlora's k-bit preparation, sparse's chosen
entries), and digests of the trained weights (ranks of a distributed run must agree)."""

from __future__ import annotations

import hashlib
from typing import Any

from training.config import TrainConfig


def adapter_model(
    model: Any, config: TrainConfig, train_set: Any, collator: Any
) -> tuple[Any, Any]:
    """The base model wrapped for training (its target modules resolved into
    `config.adapter`), and the sparse selection where `method: sparse` (else None)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from training.targets import resolve_target_modules

    model.config.use_cache = False
    config.adapter.target_modules = resolve_target_modules(model, config.adapter.target_modules)
    if config.method == "qlora":
        disable_cpu_weight_packing(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()
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
    return model, selection


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


def disable_cpu_weight_packing(model: Any) -> None:
    """bitsandbytes repacks NF4 weights for its fast CPU inference kernel the first time a
    Linear4bit runs without grad (our evaluation); training through a repacked weight then
    yields zero gradients and garbage losses (bitsandbytes 0.50, AVX512-BF16 CPUs). Keep the
    trainable layout: the repacking only speeds up inference, which the server does."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
