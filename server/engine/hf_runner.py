"""The serial fallback runner for architectures no compact family (server/engine/models/)
covers: the Hugging Face module itself, one sequence at a time, base model only."""

from __future__ import annotations

import torch

from ragtune.config import EngineConfig
from ragtune.models import LoadedModel
from server.engine.kernel_choice import dtype_name
from server.engine.models import RowScores
from server.engine.sequence import Sequence


class HFModelRunner:
    """Fallback for architectures no compact family covers: one sequence at a time with the
    Hugging Face module and its own cache; base model only."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_seq_len: int):
        self.model = loaded.model
        self.device = loaded.device
        self.max_seq_len = max_seq_len
        self.lora = None
        self.adapter_slots = None
        self._running: list[Sequence] = []
        self._max = config.max_batch_size

    def kernels(self) -> dict[str, str]:
        return {"runner": "serial", "dtype": dtype_name(self.model.dtype), "weights": "hf"}

    def can_admit(self, seq: Sequence) -> bool:
        return len(self._running) < self._max and seq.request.adapter is None

    def add(self, seq: Sequence) -> None:
        seq.cache_len = 0
        self._running.append(seq)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[torch.Tensor | None]:
        from transformers import DynamicCache

        logits = []
        for seq in seqs:
            prompt = seq.request.prompt_ids
            top = seq.params.prompt_logprobs
            out = self.model(
                input_ids=torch.tensor([prompt], device=self.device),
                past_key_values=DynamicCache(),
                use_cache=True,
                logits_to_keep=1 if top is None else 0,  # 0: every row
            )
            if top is not None:
                scores = RowScores([], [], [])
                scores.extend(out.logits[0, :-1].float(), prompt[1:], top, seq.params.prompt_ranks)
                seq.add_prompt_logprobs(prompt[1:], scores)
            seq.cache = out.past_key_values
            seq.cache_len = seq.prompt_len
            logits.append(out.logits[0, -1].float())
        return logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        rows = []
        for seq in seqs:
            ids = torch.tensor([[seq.last_token]], device=self.device)
            out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
            seq.cache = out.past_key_values
            seq.cache_len += 1
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def release(self, seq: Sequence) -> None:
        seq.cache = None
        if seq in self._running:
            self._running.remove(seq)
