"""Where an adapter version lives and how it is written: ADAPTERS/NAME/vN directories,
renamed into place only once complete, with a hidden `.vN.checkpoints/` sibling that an
interrupted run resumes from (`--resume`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ragtune.fileio import atomic_directory
from ragtune.manifest import AdapterManifest
from training.config import TrainConfig

VERSION = re.compile(r"^v(\d+)$")


def checkpoint_dir_for(adapter_dir: Path) -> Path:
    """Hidden sibling: servers skip dot-directories, like atomic_directory's scratch."""
    return adapter_dir.parent / f".{adapter_dir.name}.checkpoints"


def has_checkpoint(path: Path) -> bool:
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
            match = VERSION.match(name)
            if match:
                numbers[int(match.group(1))] = root / name
    if resume == "latest":
        unfinished = [
            n
            for n, path in numbers.items()
            if not path.exists() and has_checkpoint(checkpoint_dir_for(path))
        ]
        if not unfinished:
            raise ValueError(f"--resume: no interrupted run of {config.name!r} under {root}")
        return numbers[max(unfinished)]
    return root / f"v{max(numbers, default=0) + 1}"


def resume_checkpoint(resume: str | None, checkpoint_dir: Path) -> str | None:
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


def write_adapter_version(adapter_dir: Path, peft_model: Any, manifest: AdapterManifest) -> None:
    """Write a finished adapter version: PEFT's files and the manifest go to a scratch
    directory that is renamed into place only once complete, so a crash (or kill -9) never
    leaves a half-written version under its name."""
    with atomic_directory(adapter_dir) as scratch:
        peft_model.save_pretrained(str(scratch), safe_serialization=True)
        if not (scratch / "adapter_model.safetensors").is_file() or any(scratch.glob("*.bin")):
            raise RuntimeError("PEFT did not write adapter_model.safetensors")
        manifest.write(scratch)
