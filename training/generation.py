"""Offline text generation with a local model, for the `qa` and `code` recipes.

Greedy decoding, so `ragtune prepare --qa-generator model` is reproducible. The prompt goes
through `render_chat`, the same template the server uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class LocalGenerator:
    """messages -> completion text from a local model ('bundled' or a model directory)."""

    def __init__(self, source: str, home: Path, max_new_tokens: int = 96) -> None:
        import torch

        from ragtune.config import ModelConfig
        from ragtune.models import load_base_model

        self._torch = torch
        loaded = load_base_model(
            ModelConfig(source=source, quantization="none", dtype="fp32", device="cpu"), home
        )
        self.model: Any = loaded.model
        self.tokenizer: Any = loaded.tokenizer
        self.max_new_tokens = max_new_tokens
        self.calls = 0

    def __call__(self, messages: list[dict[str, str]]) -> str:
        from ragtune.models.chat import encode_prompt, render_chat

        ids = encode_prompt(self.tokenizer, render_chat(self.tokenizer, messages))
        input_ids = self._torch.tensor([ids])
        with self._torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=self._torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self.calls += 1
        return self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
