"""Model runner: turns sequences into next-token logits. The only module that calls the model.

This runner keeps one Hugging Face KV cache per sequence and runs them one after another;
the scheduler above it does not care how the logits are produced.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ragtune.models import LoadedModel
from server.engine.sequence import Sequence


class HFModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.device = loaded.device

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run each prompt; return [len(seqs), vocab] logits of its last position."""
        rows = []
        for seq in seqs:
            ids = torch.tensor([seq.request.prompt_ids], device=self.device)
            cache = DynamicCache()
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            seq.cache = out.past_key_values
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; return [len(seqs), vocab] logits."""
        rows = []
        for seq in seqs:
            ids = torch.tensor([[seq.last_token]], device=self.device)
            out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
            seq.cache = out.past_key_values
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def release(self, seq: Sequence) -> None:
        seq.cache = None
