"""kill -9 of a process writing a new adapter version through training's atomic write path.

A real subprocess (`tests.faults.adapter_writer`, which calls `write_adapter_version` like
`ragtune train`) stops at one point of the write (injected, so the kill lands there, not by
timing) and is SIGKILLed. Afterwards the new version must not exist under its name, its
scratch must not be loadable, the previous version must still load and answer as before in
the real server, and the next write must succeed and clean up what the killed one left.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.faults.adapter_writer import peft_model, write_version
from tests.faults.killing import kill_when_paused
from tests.server.test_adapters import assert_error, chat, load, must_load, unload

# What the killed writer must have left in its scratch, so the kill really landed mid-write.
EVIDENCE: dict[str, Callable[[Path], bool]] = {
    "weights-half-written": lambda s: (
        not (s / "ragtune_adapter.json").exists() and (s / "adapter_model.safetensors").is_file()
    ),
    "manifest-pending": lambda s: (
        (s / "adapter_config.json").is_file() and not (s / "ragtune_adapter.json").exists()
    ),
    "before-rename": lambda s: (s / "ragtune_adapter.json").is_file(),
}


@pytest.fixture(scope="module")
def model() -> Any:
    """The PEFT model the successful writes save (seed 21); the killed ones use seed 22."""
    return peft_model(21)


@pytest.fixture(scope="module")
def first_version(fault_root: Path, model: Any) -> Path:
    target = fault_root / "written" / "v1"
    write_version(target, model)
    return target


def kill_mid_write(target: Path, point: str, log: Path) -> Path:
    """Run the writer until it pauses at `point`, SIGKILL it, return its scratch directory."""
    scratch = kill_when_paused(
        ["-m", "tests.faults.adapter_writer", str(target), "22", point],
        log,
        lambda: list(target.parent.glob(f".{target.name}.*.tmp")),
    )
    assert len(scratch) == 1
    return scratch[0]


# make test kills at the first point (~7 s each); make test-all at all three
@pytest.mark.parametrize(
    "point",
    [p if i == 0 else pytest.param(p, marks=pytest.mark.slow) for i, p in enumerate(EVIDENCE)],
)
def test_kill_9_mid_adapter_write_leaves_no_half_version(
    point: str,
    tmp_path: Path,
    first_version: Path,
    model: Any,
    fault_http: httpx.Client,
    fault_client: openai.OpenAI,
) -> None:
    name = f"written-{point}"
    must_load(fault_http, name, first_version)
    reference = chat(fault_client, name)
    target = first_version.parent / f"v2-{point}"

    scratch = kill_mid_write(target, point, tmp_path / "writer.log")
    assert EVIDENCE[point](scratch)
    assert not target.exists()
    for path in (target, scratch):  # neither the missing version nor the scratch loads
        assert_error(load(fault_http, name, path, version="v2"), 400, code="invalid_adapter")
    must_load(fault_http, name, first_version, replace=True)  # the previous one still does
    assert chat(fault_client, name) == reference

    write_version(target, model)  # the next write succeeds and removes the dead scratch
    assert not scratch.exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")] == []
    loaded = must_load(fault_http, name, target)
    assert loaded["version"] == target.name
    assert chat(fault_client, name) == reference  # same weights as v1 (same model)
    assert unload(fault_http, name).status_code == 200
