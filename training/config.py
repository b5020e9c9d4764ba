"""`ragtune train` configuration: one pydantic model, filled from defaults < YAML < flags.

Unknown keys are errors (a typo in a config file must not silently train something else).
Relative paths in a YAML file are taken relative to the current directory, like flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSettings(_Strict):
    """LoRA/QLoRA rank and scaling; for `sparse` (SHiRA) `r` sets the trainable budget:
    r * (in + out) weights per target matrix, the same count LoRA of rank r would train.

    `r: auto` (and, for sparse, `density: auto`) sweeps the budget (`search`); `density` is
    the sparse budget as a fraction of all target weights, turned into the `r` whose
    r * (in + out) entries per matrix come nearest to it (PEFT's SHiRA and the server keep
    that count per matrix). `selection` chooses which entries a sparse adapter trains."""

    r: int | Literal["auto"] = Field(16, description="rank, or 'auto' to sweep `search.ranks`")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    density: float | Literal["auto"] | None = Field(
        None,
        description="sparse only: trained fraction of the target weights, in (0, 1]; replaces r",
    )
    selection: Literal["random", "gradient", "magnitude"] = Field(
        "random",
        description="sparse only: PEFT's seeded random mask, the largest accumulated |grad| "
        "over a calibration pass on the training data, or the largest |W|",
    )
    calibration_batches: int = Field(
        16, ge=1, description="gradient selection: training batches in the calibration pass"
    )

    @model_validator(mode="after")
    def _budget(self) -> AdapterSettings:
        if isinstance(self.r, int) and self.r < 1:
            raise ValueError("adapter.r must be at least 1 (or 'auto')")
        if isinstance(self.density, float) and not 0 < self.density <= 1:
            raise ValueError(f"adapter.density must be in (0, 1], got {self.density}")
        if self.r == "auto" and self.density is not None:
            raise ValueError(
                "adapter.r 'auto' and adapter.density both set: sweep one budget "
                "(--rank auto sweeps ranks, --density auto sweeps densities)"
            )
        return self

    @property
    def auto(self) -> bool:
        return self.r == "auto" or self.density == "auto"


class SearchSettings(_Strict):
    """`r: auto` / `density: auto`: candidates, tried smallest first, each trained with the
    full settings (max_steps, early stopping on val) until the budget would be exceeded; the
    chosen one is the adapter written (see training/rank_search.py for the rule)."""

    budget_minutes: float = Field(10.0, gt=0, description="wall-time budget of the sweep")
    ranks: list[int] = Field(default_factory=lambda: [2, 4, 8, 16, 32], min_length=1)
    densities: list[float] = Field(
        default_factory=lambda: [0.005, 0.01, 0.02, 0.04, 0.08], min_length=1
    )
    tolerance: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="keep the smallest candidate with at least (1 - tolerance) of the best "
        "candidate's validation-loss reduction",
    )

    @model_validator(mode="after")
    def _candidates(self) -> SearchSettings:
        if any(r < 1 for r in self.ranks):
            raise ValueError("search.ranks must be at least 1")
        if any(not 0 < d <= 1 for d in self.densities):
            raise ValueError("search.densities must be in (0, 1]")
        return self


class TrainConfig(_Strict):
    name: str = Field("adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="default: next free vN under the adapter's name",
    )
    base_model: str = Field("bundled", description="'bundled' or a local model directory")
    data: Path = Field(Path("data/prepared"), description="directory from `ragtune prepare`")
    output: Path | None = Field(None, description="default $RAGTUNE_HOME/adapters/NAME/VERSION")
    method: Literal["lora", "qlora", "sparse"] = "lora"
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)

    max_steps: int = Field(200, ge=1, description="optimizer steps (an upper bound)")
    epochs: float = Field(3.0, gt=0, description="used only when max_steps is -1")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1, description="per process")
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=16, description="longer examples are truncated")
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length together (transformers' "
        "LengthGroupedSampler): less padding, so a mix of short and long examples trains "
        "faster; batches are still drawn in a seeded random order",
    )
    gradient_checkpointing: bool = False
    dtype: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="fp32; bf16 (GPUs: mixed precision; CPUs: bf16 weights); auto: fp32 "
        "weights with bf16 autocast (mixed precision) where the device has native bf16 "
        "(CUDA, CPUs with AVX-512 BF16 or AMX), else fp32",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads per process")

    eval_steps: int = Field(20, ge=1, description="validation loss every N steps")
    save_steps: int | None = Field(
        None,
        ge=1,
        description="checkpoint every N steps (default: eval_steps; must be a multiple of it)",
    )
    save_total_limit: int = Field(2, ge=1)
    early_stopping_patience: int | None = Field(
        3, ge=1, description="stop after N evaluations without improvement; null disables"
    )
    early_stopping_threshold: float = Field(0.0, ge=0)
    keep_checkpoints: bool = Field(False, description="keep the run's checkpoints after success")
    seed: int = 42
    progress: bool = True
    logging_steps: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _checkpoint_cadence(self) -> TrainConfig:
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError("save_steps must be a multiple of eval_steps (best-model tracking)")
        if self.method != "sparse":
            if self.adapter.density is not None:
                raise ValueError(
                    f"adapter.density (--density) applies to --method sparse only, not "
                    f"{self.method}: set the LoRA budget with adapter.r (--rank)"
                )
            if self.adapter.selection != "random":
                raise ValueError(
                    f"adapter.selection (--sparse-selection) applies to --method sparse only, "
                    f"not {self.method}"
                )
        return self

    @property
    def checkpoint_every(self) -> int:
        return self.save_steps or self.eval_steps


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def load_train_config(
    path: Path | str | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """YAML file (optional) then overrides ({"max_steps": 10, "adapter.r": 8, ...})."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data = loaded
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return TrainConfig.model_validate(data)
