"""Per-row logits shaping before a token is chosen: the min_tokens mask, `logit_bias` and the
repetition/presence/frequency penalties (vLLM's order and semantics).

Built only for rows that use one of them (plain rows never pay for it), and sparse: each step
touches only the token ids a control names or the row has seen, never the whole vocabulary,
so a penalized row costs microseconds, not a pass over 49k logits per control.

A grammar row draws first from its row without the grammar's mask and keeps the token when
the grammar accepts it; only a refused token pays for the vocabulary mask (~0.1 ms a row a
step) and a second draw from the masked row. The result is that of masking first: greedy,
the masked argmax is the accepted token; temperature sampling, a draw from p kept when
allowed, else a draw from p masked, picks an allowed x with p(x) + (1 - Z) p(x) / Z = p(x) / Z,
the masked distribution (Z: p's mass on allowed tokens). Top-k, top-p and min-p cut the
distribution by rank, which the mask changes, so rows using them mask first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from server.engine.grammar import RowGrammar
from server.engine.types import SamplingParams


class RowControls:
    """One sequence's logits controls and the history they need: its output token counts
    (presence/frequency), its prompt and output token set (repetition), how many tokens it
    has generated (min_tokens). `record` is called with every token drawn for the row."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        stop_ids: Iterable[int],
        grammar: RowGrammar | None = None,  # structured output: masks what may come next
    ):
        self.params = params
        self.grammar = grammar
        # a draw without the mask is kept when allowed: exact for greedy and plain temperature
        self._draw_first = params.greedy or (
            params.top_p >= 1.0 and params.top_k <= 0 and params.min_p <= 0.0
        )
        self.generated = 0
        self._suppress = _ids(sorted(set(stop_ids))) if params.min_tokens else None
        self._bias_ids = _ids([token for token, _ in params.logit_bias])
        self._bias = torch.tensor([value for _, value in params.logit_bias], dtype=torch.float32)
        self._counts: dict[int, int] = {}  # output token -> times generated
        self._seen: set[int] | None = None  # prompt + output, only for repetition_penalty
        self._seen_ids: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = set(prompt_ids)
            self._seen_ids = _ids(sorted(self._seen))

    def choose(self, logits: torch.Tensor, sample: Callable[[torch.Tensor], int]) -> int:
        """Shape the [vocab] row, draw its token with `sample`, record it (module docstring:
        how a grammar row draws)."""
        row = self.shape(logits)
        grammar = self.grammar
        if grammar is None:
            token = sample(row)
        elif self._draw_first and grammar.try_accept(token := sample(row)):
            pass
        else:
            grammar.mask(row)
            token = sample(row)
            grammar.accept(token)
        self.record(token)
        return token

    def try_keep(self, token: int) -> bool:
        """Record `token` if this row may take it as drawn (no grammar, or one that accepts
        it): the batch's greedy argmax for a greedy row with no other control."""
        if self.grammar is not None and not self.grammar.try_accept(token):
            return False
        self.record(token)
        return True

    def record(self, token: int) -> None:
        self.generated += 1
        self._counts[token] = self._counts.get(token, 0) + 1
        if self._seen is not None and token not in self._seen:
            self._seen.add(token)
            self._seen_ids = torch.cat([self._seen_ids, _ids([token])])

    def shape(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] float32 -> a shaped copy (the caller keeps the raw row for
        logprobs); the grammar's mask is `choose`'s."""
        p = self.params
        row = logits.clone()
        vocab = row.shape[0]
        if self._suppress is not None and self.generated < p.min_tokens:
            row[_within(self._suppress, vocab)] = float("-inf")
        if len(self._bias_ids):
            keep = self._bias_ids < vocab
            row[self._bias_ids[keep]] += self._bias[keep]  # ids are unique (a dict's keys)
        if self._seen_ids is not None:
            ids = _within(self._seen_ids, vocab)
            values = row[ids]
            penalty = p.repetition_penalty
            row[ids] = torch.where(values > 0, values / penalty, values * penalty)
        if (p.frequency_penalty or p.presence_penalty) and self._counts:
            ids = _ids(list(self._counts))
            counts = torch.tensor(list(self._counts.values()), dtype=torch.float32)
            keep = ids < vocab
            row[ids[keep]] -= p.frequency_penalty * counts[keep] + p.presence_penalty
        return row


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _within(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Ids the logits row has (a tokenizer may know more tokens than the model's head)."""
    return ids[ids < vocab]
