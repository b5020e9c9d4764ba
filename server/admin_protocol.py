"""Admin request bodies: adapter load/unload/activate, canary splits and promotion decisions
(server/admin.py), and documents to index."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from server.protocol import RequestModel


class LoadLoraAdapterRequest(RequestModel):
    """vLLM-compatible (`lora_name`, `lora_path`) plus ragtune's versioning fields."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    version: str | None = None
    replace: bool = False
    activate: bool = True


class UnloadLoraAdapterRequest(RequestModel):
    model_config = ConfigDict(extra="allow")  # vLLM clients may send lora_int_id

    lora_name: str
    version: str | None = None


class ActivateAdapterRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    version: str


class CanaryRequest(RequestModel):
    """POST /v1/adapters/{name}/canary: send `fraction` of `model=name` traffic to
    `version` (a loaded version other than the active one)."""

    model_config = ConfigDict(extra="forbid")

    version: str
    fraction: float = Field(gt=0, le=1)


class PromoteAdapterRequest(RequestModel):
    """POST /v1/adapters/{name}/promote: a gate's decision (`ragtune adapters promote`),
    audited and written to the version's manifest; `accepted` also activates `version`."""

    model_config = ConfigDict(extra="forbid")

    version: str
    accepted: bool
    gate: dict[str, Any] = Field(default_factory=dict)  # metric, min_delta, the numbers
    requested_by: str | None = Field(None, max_length=200)


class IndexSourcesRequest(RequestModel):
    """Documents to index: files or directories under `retrieval.source_roots`."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, max_length=256)
