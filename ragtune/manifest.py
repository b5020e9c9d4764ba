"""The ragtune adapter manifest (`ragtune_adapter.json`) written by training and read by the
server: lineage (base fingerprint, data hash) and what the adapter is, beside PEFT's files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ragtune.fileio import atomic_write_text

MANIFEST_NAME = "ragtune_adapter.json"


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str = Field(description="e.g. 'v3' or a timestamp; unique per adapter name")
    base_model_fingerprint: str
    method: str = Field(description="lora | qlora | sparse")
    rank: int | None = None
    target_modules: list[str] = Field(default_factory=list)
    data_hash: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )

    def write(self, adapter_dir: Path) -> None:
        atomic_write_text(adapter_dir / MANIFEST_NAME, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterManifest | None:
        path = adapter_dir / MANIFEST_NAME
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
