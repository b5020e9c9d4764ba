"""`ragtune retrain --config configs/retrain/NAME.yaml`: what one periodic retraining run
reads, trains on, gates against and promotes to.

Strict like the training config (`training/config.py`): unknown keys are errors. Relative
paths are taken against the current directory, like every other ragtune path. The admin key
is never in the file: `server.admin_key_env` names the environment variable holding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from training.recipes import RECIPES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentSettings(_Strict):
    """The documents `ragtune prepare` reads; only those whose content changed since the
    last successful run are prepared again."""

    sources: list[Path] = Field(default_factory=list, description="files or directories")
    recipe: str = Field("qa", description=f"one of {', '.join(RECIPES)}")
    qa_generator: Literal["template", "model"] = "template"
    generator_model: str = "bundled"
    questions_per_unit: int = Field(3, ge=1)
    mask_pii: bool = True


class FeedbackSettings(_Strict):
    enabled: bool = True
    dir: Path | None = Field(None, description="default $RAGTUNE_HOME/feedback")


class SplitSettings(_Strict):
    """How the merged dataset is split (by document / response id, as `ragtune prepare`)."""

    val_ratio: float = Field(0.1, ge=0, lt=1)
    test_ratio: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    near_duplicate_threshold: float | None = Field(0.8, gt=0, le=1)


class TrainSettings(_Strict):
    config: Path | None = Field(None, description="configs/train/NAME.yaml it builds on")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys laid over the file, e.g. {max_steps: 40, adapter.r: 8}; "
        "name, version, data and output are set by the run",
    )


class GateSettings(_Strict):
    questions: Path = Field(description="bench-format QA JSONL both versions answer")
    metric: str = "auto"
    min_delta: float = Field(0.0, ge=0)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    max_tokens: int = Field(32, ge=1)
    concurrency: int = Field(8, ge=1)


class ServerSettings(_Strict):
    url: str = Field("http://127.0.0.1:8000/v1", description="the server's /v1 URL")
    admin_key_env: str = Field(
        "RAGTUNE_ADMIN_KEYS", description="environment variable holding the admin key"
    )
    timeout_s: float = Field(120, gt=0)


class RetrainConfig(_Strict):
    adapter: str = Field(pattern=NAME_PATTERN, description="adapter name on the server")
    documents: DocumentSettings = Field(default_factory=DocumentSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    gate: GateSettings
    server: ServerSettings = Field(default_factory=ServerSettings)
    keep_runs: int = Field(10, ge=1, description="finished run directories kept")


def load_retrain_config(path: Path | str) -> RetrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrain config not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    config = RetrainConfig.model_validate(data)
    if config.documents.recipe not in RECIPES:
        raise ValueError(
            f"{path}: documents.recipe {config.documents.recipe!r} is not one of "
            f"{', '.join(RECIPES)}"
        )
    if not config.documents.sources and not config.feedback.enabled:
        raise ValueError(f"{path}: give documents.sources or enable feedback")
    reserved = {"name", "version", "data", "output"} & set(config.train.overrides)
    if reserved:
        raise ValueError(
            f"{path}: train.overrides may not set {', '.join(sorted(reserved))} (the run does)"
        )
    return config
