"""Write an adapter version the way `ragtune train` does (`write_adapter_version`), from a
random-weight PEFT model of the bundled base; run as a script it can stop at one point of the
write and wait there to be killed:

    python -m tests.faults.adapter_writer TARGET SEED [POINT]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ragtune.config import default_home
from ragtune.manifest import AdapterManifest
from ragtune.models import resolve_model_dir
from ragtune.models.loader import model_fingerprint
from ragtune.random_adapter import ATTENTION, random_peft_model
from training.versions import write_adapter_version

RANK = 8


def peft_model(seed: int) -> Any:
    return random_peft_model(RANK, ATTENTION, seed, scale=0.5)


def write_version(target: Path, model: Any) -> None:
    manifest = AdapterManifest(
        name=target.parent.name,
        version=target.name,
        base_model_fingerprint=model_fingerprint(
            resolve_model_dir("bundled", default_home()), default_home()
        ),
        method="lora",
        rank=RANK,
        target_modules=ATTENTION,
    )
    write_adapter_version(target, model, manifest)


def pause(*args: Any, **kwargs: Any) -> None:
    print("paused", flush=True)
    time.sleep(3600)


def install_pause(point: str, target: Path) -> None:
    """Stop the write at `point` (then wait to be killed)."""
    if point == "weights-half-written":
        import peft.peft_model

        save = peft.peft_model.safe_save_file

        def half(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
            save(tensors, filename, *args, **kwargs)
            size = Path(filename).stat().st_size
            with open(filename, "r+b") as handle:
                handle.truncate(size // 2)
            pause()

        peft.peft_model.safe_save_file = half
    elif point == "manifest-pending":
        AdapterManifest.write = pause
    elif point == "before-rename":
        import os

        replace = os.replace
        os.replace = lambda src, dst: pause() if Path(dst) == target else replace(src, dst)
    elif point != "none":
        raise ValueError(point)


if __name__ == "__main__":
    target, seed = Path(sys.argv[1]), int(sys.argv[2])
    install_pause(sys.argv[3] if len(sys.argv) > 3 else "none", target)
    write_version(target, peft_model(seed))
    print("finished", flush=True)
