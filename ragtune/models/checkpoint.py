"""Read single tensors from a model directory's safetensors files, without loading the model.

The compact forward packs its own int4/int8 decode weights; when the loaded model is
bitsandbytes-quantized, packing from the checkpoint avoids rounding a second grid on top of
bitsandbytes' one (an 8-bit base re-rounded to int4 lost the bundled model's answer to
"What is the capital of France?"; from the checkpoint it keeps it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


class Checkpoint:
    def __init__(self, model_dir: Path):
        self._file_of: dict[str, Path] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._file_of[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __iter__(self):
        return iter(self._file_of)

    def shape_and_dtype(self, key: str) -> tuple[list[int], str]:
        """A tensor's shape and safetensors dtype ("BF16", "F8_E4M3", ...), unread."""
        with safe_open(str(self._file_of[key]), framework="pt") as handle:
            part = handle.get_slice(key)
            return part.get_shape(), part.get_dtype()

    def tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self._file_of[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def open_checkpoint(model_dir: Path | None) -> Checkpoint | None:
    """The checkpoint of a model directory, or None when there is none to read."""
    if model_dir is None or not any(Path(model_dir).glob("*.safetensors")):
        return None
    return Checkpoint(model_dir)
