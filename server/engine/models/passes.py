"""The two forward passes every model family shares, over a slot KV cache: chunked prefill of
several prompts in one forward (with prompt logprobs when asked) and one batched decode step.

They live apart from the weights and per-family arithmetic (base.py) because they are where
batch invariance is decided: which rows share a GEMM, how a lone row or padding runs, and
which attention extents each row sees. `DecoderModel` mixes them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine import attention_rows
from server.engine.lora_apply import LayerAdapters
from server.engine.lora_graph import every_slot_terms, slot_mask
from server.engine.models.attention import (
    attention,
    decode_attention,
    plan_decode,
    prompt_attention,
)
from server.engine.sampler import token_logprobs

if TYPE_CHECKING:
    from server.engine.kv_cache import KVCache
    from server.engine.lora import LoraSlots
    from server.engine.lora_apply import LoraBatch

# Prompt rows whose full-vocabulary logprobs exist at once (Gemma's 262k vocabulary: 64 rows
# are 67 MB of float32)
SCORE_ROWS = 64
# Under fixed_prefill_rows, the chunks' last rows go through the vocabulary projection in
# blocks of this many (padded), so its GEMM shape does not depend on how many prompts shared
# the forward
LOGIT_ROWS = 16


@dataclass
class PromptChunk:
    """Positions start..start+len(tokens) of one sequence's prompt."""

    tokens: list[int]
    start: int
    slot: int  # KV cache slot
    lora_slot: int  # -1: the base model
    # The prompt's kernel class: more than WIDE_ROWS tokens in the whole prompt (not this
    # chunk), so every chunk of a prompt, cached or computed, runs the same GEMMs. A chunk
    # is never one row unless the prompt is (the one-row GEMM path is not row-independent
    # on every input; see DecoderModel.decode).
    wide: bool
    # Prompt logprobs: the tokens each row predicts (the prompt's next tokens; one fewer
    # than the rows where the chunk ends the prompt) and how many top alternatives; None:
    # not asked. `prefill` puts the result in `scores`.
    targets: list[int] | None = None
    top: int = 0
    ranks: bool = False  # each target's rank too (chat `prompt_logprobs`; echo has none)
    scores: RowScores | None = None


@dataclass
class RowScores:
    """Log-probabilities of prompt tokens under the model's raw distribution: per scored row
    the target token's logprob and the `top` most likely (ids, logprobs), most likely first."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    ranks: list[int] = field(default_factory=list)  # the target's rank, 1 = most likely

    def extend(
        self, logits: torch.Tensor, targets: list[int], top: int, ranks: bool = False
    ) -> None:
        """Score rows of float32 logits [rows, vocab] predicting `targets` (`ranks`: and
        each target's rank, a pass over the vocabulary that echo requests skip). Each row is
        computed as the sampler computes a drawn token's logprobs (sampler.token_logprobs:
        the logit minus that row's own logsumexp), so a prompt row scored here and the same
        row's first generated token give the same numbers (the bench's likelihood read from
        a generation request equals an echo's)."""
        logits = logits.cpu()
        for row, target in zip(logits, targets, strict=True):
            scored = token_logprobs(row, target, top)
            self.logprobs.append(scored.logprob)
            self.top_ids.append([token for token, _ in scored.top])
            self.top_logprobs.append([logprob for _, logprob in scored.top])
        if ranks:  # int32 sums: twice as fast as int64 over a [rows, vocab] comparison
            chosen = logits.gather(1, torch.tensor(targets)[:, None])
            self.ranks += ((logits > chosen).sum(dim=-1, dtype=torch.int32) + 1).tolist()


class ForwardPasses:
    """`prefill` and `decode` over a `DecoderModel`'s weights (mixed into it)."""

    def mask(
        self, queries: torch.Tensor, length: int, window: int | None, ring: int | None = None
    ) -> torch.Tensor:
        """[rows, length] additive bias: 0 where the query at position queries[i] may look
        (causal, and within its sliding window), -inf elsewhere (weighs exactly zero). With
        `ring` (a sliding-window layer's ring of KV positions, KVCache) key index j holds the
        latest position p - ((p - j) mod ring) a query at p may see: visible when that is at
        most window - 1 back and not before the sequence's start."""
        keys = torch.arange(length, device=self.device)[None, :]
        if ring is not None and window is not None:
            back = (queries[:, None] - keys) % ring
            hidden = (back >= window) | (back > queries[:, None])
        else:
            hidden = keys > queries[:, None]
            if window is not None:  # Hugging Face's sliding_window_overlay: k > q - window
                hidden |= keys <= queries[:, None] - window
        bias = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill(hidden, float("-inf"))

    # ------------------------------------------------------------------------------ passes
    @torch.inference_mode()
    def prefill(
        self, chunks: list[PromptChunk], cache: KVCache, lora_slots: LoraSlots | None
    ) -> torch.Tensor:
        """Run one chunk of each of several prompts in one forward: their rows share every
        GEMM (one read of the weights for all of them), attention runs per prompt. The chunks
        must be of one kernel class (see `prefill_groups`).

        Every row's result depends on its own prompt only, not on how the prompt is cut into
        chunks nor on the other prompts of the forward (where `rows_independent`): the GEMMs
        give a row the same bits in any batch, and the attention below is exact under any
        query subset and masked key extent.

        Where GEMMs depend on the row count (`fixed_prefill_rows`: GPUs) every forward is
        padded to that many rows: one GEMM shape for every prompt, alone or sharing.

        Returns [len(chunks), vocab] float32 logits of each chunk's last token.
        """
        wide = chunks[0].wide
        if any(c.wide != wide for c in chunks):
            raise ValueError("prompt chunks of both kernel classes in one forward")
        device = self.device
        tokens = [t for c in chunks for t in c.tokens]
        pad = self.prefill_rows(len(tokens)) - len(tokens)
        ids = torch.tensor(tokens + [0] * pad, device=device)
        positions = torch.cat(
            [torch.arange(c.start, c.start + len(c.tokens)) for c in chunks]
            + [torch.zeros(pad, dtype=torch.long)]
        )
        positions = positions.to(device)
        x = self.embed[ids]
        rotary = self._rotary(positions)
        bounds, masks, offset = [], [], 0
        for c in chunks:
            count = len(c.tokens)
            bounds.append((offset, offset + count))
            rows = positions[offset : offset + count]
            # window -> [count, keys]: token i sees cache positions <= start + i (in its
            # window; a ring layer's keys are its ring's indices)
            keys = self.prompt_keys(c.start + count, cache.max_len)
            masks.append({w: self.ring_mask(rows, keys, w, cache) for w in self.windows})
            offset += count
        lora, every_slot_mask = None, None
        if lora_slots is not None and any(c.lora_slot >= 0 for c in chunks):
            row_slots = [c.lora_slot for c in chunks for _ in c.tokens] + [-1] * pad
            rows_tensor = torch.tensor(row_slots, device=device)
            if self.fixed_prefill_rows and not set(row_slots) & set(lora_slots.sparse):
                # shapes set by the slot count alone, not by the neighbours' adapters
                every_slot_mask = slot_mask(lora_slots, rows_tensor)
            else:
                lora = lora_slots.batch(rows_tensor)
        for index, w in enumerate(self.layers):
            layer_lora = lora.layer(index) if lora is not None else None
            if every_slot_mask is not None:
                terms = every_slot_terms(lora_slots, every_slot_mask, index)
                layer_lora = LayerAdapters({}, {}, {}, terms)
            q, k, v = self._attention_input(w, x, rotary, layer_lora, wide)
            parts = []
            for c, (lo, hi), mask in zip(chunks, bounds, masks, strict=True):
                cache.write_prompt(index, c.slot, c.start, k[lo:hi], v[lo:hi])
                keys = self.prompt_keys(c.start + hi - lo, cache.max_len)
                keys_t, values = cache.prompt_view(index, c.slot, keys)
                parts.append(prompt_attention(self, q[lo:hi], keys_t, values, mask[w.window]))
            if pad:  # padding rows attend to nothing
                parts.append(q.new_zeros(pad, self.q_size))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = self._attention_output(w, x, attn, layer_lora, wide)
        for c, (lo, _) in zip(chunks, bounds, strict=True):
            if c.targets is not None:
                c.scores = self._score(x[lo : lo + len(c.targets)], c.targets, c.top, c.ranks)
        last = [hi - 1 for _, hi in bounds]
        if not self.fixed_prefill_rows:
            return self._logits(x[torch.tensor(last, device=device)])
        # the vocabulary projection too on a fixed row count, whatever shares the forward
        blocks = -(-len(last) // LOGIT_ROWS) * LOGIT_ROWS
        padded = torch.tensor(last + [last[-1]] * (blocks - len(last)), device=device)
        logits = [
            self._logits(x[padded[lo : lo + LOGIT_ROWS]]) for lo in range(0, blocks, LOGIT_ROWS)
        ]
        return torch.cat(logits)[: len(last)]

    def ring_mask(
        self, queries: torch.Tensor, length: int, window: int | None, cache: KVCache
    ) -> torch.Tensor:
        """`mask` over the keys a layer with this window holds for `length` positions (all
        of them, or a sliding-window layer's ring: KVCache.keys_in)."""
        ring = cache.ring_for(window)
        keys = length if ring is None else min(length, ring)
        return self.mask(queries, keys, window, ring)

    def prefill_rows(self, tokens: int) -> int:
        """The rows a prompt forward of `tokens` tokens runs on (see fixed_prefill_rows and
        prefill_row_multiple)."""
        if self.fixed_prefill_rows:
            return max(tokens, self.fixed_prefill_rows)
        if self.prefill_row_multiple:
            return -(-tokens // self.prefill_row_multiple) * self.prefill_row_multiple
        return tokens

    def prompt_keys(self, end: int, max_len: int) -> int:
        """The key extent a prompt chunk ending at `end` attends over: `end`, or rounded up to
        prompt_key_multiple (the keys past `end` masked), at most the cache's length."""
        if not self.prompt_key_multiple:
            return end
        return min(-(-end // self.prompt_key_multiple) * self.prompt_key_multiple, max_len)

    def _score(self, x: torch.Tensor, targets: list[int], top: int, ranks: bool) -> RowScores:
        """Prompt logprobs of the rows `x` predicting `targets`, SCORE_ROWS rows at a time,
        so a long prompt never holds its whole [rows, vocab] log-softmax."""
        scores = RowScores([], [], [])
        for lo in range(0, x.shape[0], SCORE_ROWS):
            logits = self._logits(x[lo : lo + SCORE_ROWS])
            scores.extend(logits, targets[lo : lo + SCORE_ROWS], top, ranks)
        return scores

    def prefill_groups(self, chunks: list[PromptChunk]) -> list[list[int]]:
        """Which chunks may share a forward: those of one kernel class, where every GEMM gives
        a row the same bits in any batch (`rows_independent`), or where every forward runs
        on `fixed_prefill_rows` rows (as many chunks as fit); else one each."""
        narrow = [i for i, c in enumerate(chunks) if not c.wide]
        wide = [i for i, c in enumerate(chunks) if c.wide]
        if self.fixed_prefill_rows:
            return [
                group
                for kind in (narrow, wide)
                for group in _fill(kind, chunks, self.fixed_prefill_rows)
            ]
        if not self.rows_independent:
            return [[i] for i in range(len(chunks))]
        return [group for group in (narrow, wide) if group]

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,  # [batch] last token of each running sequence (rows = slots)
        positions: torch.Tensor,  # [batch] position of that token
        write_positions: torch.Tensor,  # [batch] where its K/V go (= positions for real rows)
        cache: KVCache,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """One decode step for the sequences in slots 0..batch-1; returns [batch, vocab].

        A lone row that goes through oneDNN GEMMs (dense weights, or LoRA) is computed as two
        identical rows: on some CPUs oneDNN's one-row (GEMV) kernel sums in another order than
        its kernels for two or more rows, which would make a request's tokens depend on
        whether it had batch neighbours. (Here the load-time GEMM check passes even at one row
        on random data, yet a lone LoRA row computed alone got other K/V bits at step 12 on the
        real model: the one-row path is data-dependent, so it is never used for a row that has
        neighbours elsewhere; see also PromptChunk.) The packed int4/int8 kernels give a row
        the same bits at one row as at two (checked in tests/engine), so a lone base-model
        row with them runs alone.

        Where GEMMs depend on the row count at any size (`fixed_decode_rows`: AMX, MKL), the
        two-row trick is not enough: LoRA GEMMs (every GEMM under dense weights) run on
        `fixed_decode_rows` rows, the extra ones zero, and attention extents follow each row's
        own length (attention.plan_decode). LoRA rows on the rowwise route (packed weights:
        engine/lora_rowwise.py) need neither.
        """
        real = tokens.shape[0]
        fixed = self.fixed_decode_rows
        float_lora = lora is not None and not lora.rowwise_only  # rowwise: rows on their own
        if fixed and self.weights == "dense" and real < fixed:  # every GEMM sees `fixed` rows
            pad = tokens.new_zeros(fixed - real)
            tokens, positions = torch.cat((tokens, pad)), torch.cat((positions, pad))
            lora = lora.pad_rows(fixed) if lora is not None else None
        elif fixed and float_lora:  # packed base GEMMs are row-independent; float LoRA's not
            lora = lora.pad_rows(fixed)
        elif real == 1 and (self.weights == "dense" or float_lora):
            tokens, positions = tokens.repeat(2), positions.repeat(2)
            lora = lora.repeat_rows(2) if lora is not None else None
        batch = tokens.shape[0]
        x = self.embed[tokens]
        rotary = self._rotary(positions)
        kernel = self.attention_kernel  # one call a layer, rows on their own
        # the kernel turns q and the new keys itself (the same bits as _rotate, one call)
        kernel_rotates = kernel and attention_rows.rotates(self)
        if kernel:
            steps = {
                w: attention_rows.plan(self, positions[:real], write_positions, cache, w)
                for w in self.windows
            }
        else:
            rows = torch.arange(real, device=self.device)
            extents = {w: plan_decode(self, positions[:real], cache, w) for w in self.windows}

        # every layer in one kernel call where it runs (engine/decode_layers.py: the same bits)
        fused = self.decode_layers if kernel_rotates and batch == real else None
        out = fused.run(self, x, steps, rotary, cache, lora) if fused is not None else None
        if out is not None:
            return self._logits(out)
        for index, w in enumerate(self.layers):
            layer_lora = lora.layer(index) if lora is not None else None
            q, k, v = self._attention_input(w, x, rotary, layer_lora, rotate=not kernel_rotates)
            rope = rotary[w.rope] if kernel_rotates else None
            if kernel and batch == real:  # the usual step: every row real, no slicing
                attn = attention_rows.attend(self, index, q, k, v, cache, steps[w.window], rope)
            elif kernel:
                attn = attention_rows.attend(
                    self, index, q[:real], k[:real], v[:real], cache, steps[w.window], rope
                )
            else:
                cache.write_decode(index, rows, write_positions, k[:real], v[:real])
                attn = decode_attention(self, index, q[:real], cache, extents[w.window])
            if batch > real:  # copies of a lone row, or padding: attention is per row
                attn = (
                    attn.expand(batch, -1)
                    if real == 1 and not fixed
                    else torch.cat((attn, attn.new_zeros(batch - real, self.q_size)))
                )
            x = self._attention_output(w, x, attn, layer_lora)
        logits = self._logits(x)
        return logits if batch == real else logits[:real]

    @torch.inference_mode()
    def decode_static(
        self,
        inputs: torch.Tensor,  # [4, rows]: token, position, write position, LoRA slot (-1)
        cache: KVCache,
        length: int,  # keys every row attends over (its own masked)
        lora_slots: LoraSlots | None,  # None: no row uses an adapter
    ) -> torch.Tensor:
        """One decode step whose shapes depend only on the row count and `length`, with no
        choice made on the host and no synchronisation with it, so that a CUDA graph can
        capture it (engine/cuda_graphs.py). Every row attends over `length` keys, masked to
        its own; with `lora_slots` every slot's factors apply to every row, masked to its own
        slot (engine/lora_graph.py). A row's bits depend on neither its neighbours nor its
        place: the shapes are the same every step, and masked keys and other slots add exact
        zeros. The cache must have a fixed layout (its addresses are captured); rows past
        the running sequences write position 0 of their free slot. Returns [rows, vocab]."""
        tokens, positions, writes, row_slots = inputs.unbind(0)
        rows = tokens.shape[0]
        kv, d = self.num_kv_heads, self.head_dim
        group = self.num_heads // kv
        x = self.embed[tokens]
        rotary = self._rotary(positions)
        biases = {  # [rows * kv_heads, heads per kv head, length]
            w: self.mask(positions, length, w)[:, None, :]
            .repeat_interleave(kv, 0)
            .expand(-1, group, -1)
            .contiguous()
            for w in self.windows
        }
        slots = torch.arange(rows, device=self.device)
        mask = slot_mask(lora_slots, row_slots) if lora_slots is not None else None
        for index, w in enumerate(self.layers):
            layer_lora = None
            if mask is not None:
                layer_lora = LayerAdapters({}, {}, {}, every_slot_terms(lora_slots, mask, index))
            q, k, v = self._attention_input(w, x, rotary, layer_lora)
            cache.write_decode(index, slots, writes, k, v)
            keys_t, values = cache.batch_view(index, rows, length)
            attn = attention(
                q.reshape(rows * kv, group, d),
                keys_t.reshape(rows * kv, d, length),
                values.reshape(rows * kv, length, d),
                biases[w.window],
                self.scale,
                self.attn_softcap,
            )
            x = self._attention_output(w, x, attn.reshape(rows, self.q_size), layer_lora)
        return self._logits(x)


def _fill(indices: list[int], chunks: list[PromptChunk], rows: int) -> list[list[int]]:
    """Consecutive chunks packed into forwards of at most `rows` tokens each."""
    groups: list[list[int]] = []
    used = rows
    for i in indices:
        count = len(chunks[i].tokens)
        if used + count > rows:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += count
    return groups
