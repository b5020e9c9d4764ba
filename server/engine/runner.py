"""Model runners turn scheduled sequences into next-token logits; the only code that runs the
model. `CompactRunner` batches every running sequence (and its adapter) into one decode forward
of the model's family (server/engine/models/); `HFModelRunner` (server/engine/hf_runner.py) is
the fallback for architectures no family covers. The kernels each runs with are chosen in
server/engine/kernel_choice.py."""

from __future__ import annotations

import logging

import torch

from ragtune.config import EngineConfig
from ragtune.hardware import detect
from ragtune.models import LoadedModel
from server.engine.adapter_slots import AdapterSlotTable
from server.engine.cuda_graphs import GraphedDecode
from server.engine.hf_runner import HFModelRunner
from server.engine.kernel_choice import (
    attention_kernel,
    decode_weights,
    dtype_name,
    is_cpu,
    layers_kernel,
    lora_dtype,
    weights_label,
)
from server.engine.kv_cache import KVCache, extent_class
from server.engine.lora import LoraSlots
from server.engine.lora_rowwise import rowwise_supported
from server.engine.models import (
    WIDE_ROWS,
    DecoderModel,
    PromptChunk,
    model_class,
    module_shapes,
)
from server.engine.models.exactness import (
    PROMPT_KEY_MULTIPLE,
    describe_sharing,
    padded_extents_exact,
    torch_attention_unexact,
    wide_weights,
)
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Where GEMMs depend on the row count on a CPU (AMX, MKL): prompt forwards' rows rounded up to
# this multiple, prompt attention's keys to exactness.PROMPT_KEY_MULTIPLE (models/base.py;
# with row blocks the keys only). Measured on AMX with
# the bundled model: the last prompt row's logits after a prefill of n tokens and of n + 1
# (an echoed choice) were bit-identical for 30 of 39 lengths between 40 and 257 unpadded,
# 38 with the keys padded, 39 with both.
PREFILL_ROW_MULTIPLE = 16


class CompactRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        max_seq_len: int,
        family: type[DecoderModel] | None = None,  # default: the one for the model's config
        static_decode: bool | None = None,  # default: on CUDA with engine.cuda_graphs
        team_may_shrink: bool = False,  # model.threads auto (engine/team_size.py)
    ):
        if family is None:
            family, reason = model_class(loaded.model.config)
            if family is None:
                raise ValueError(f"the compact engine cannot run this model: {reason}")
        self.model = family(
            loaded.model,
            loaded.dtype,
            loaded.device,
            decode_weights(config, loaded),
            loaded.model_dir,
            max_positions=max_seq_len,
            row_blocks=config.prompt_row_blocks,
            prompt_attention=config.prompt_attention,
            team_may_shrink=team_may_shrink,
        )
        self.device = loaded.device
        self.max_seq_len = max_seq_len
        self.prefill_chunk = config.prefill_chunk
        m = self.model
        if static_decode is None:
            static_decode = config.cuda_graphs and str(loaded.device).startswith("cuda")
        m.attention_kernel = attention_kernel(config, m, loaded.device, static_decode)
        if m.rows_independent and not m.row_blocks and is_cpu(loaded.device):
            reason, padded = torch_attention_unexact(m, max_seq_len)
            if reason is not None:  # computed apart, as where the GEMMs sum by the row count
                logger.info("prompt rows computed apart: %s", reason)
                m.rows_independent = False
                m.padded_extents = padded or padded_extents_exact(m, max_seq_len)
        if not m.rows_independent or m.row_blocks:  # this device sums by the row count
            m.fixed_decode_rows = config.max_batch_size
            if not is_cpu(loaded.device):  # padding a prompt forward is cheap beside launches
                m.fixed_prefill_rows = config.prefill_chunk
            else:  # see DecoderModel.prefill_row_multiple (row blocks need no row padding)
                if not m.row_blocks:
                    m.prefill_row_multiple = PREFILL_ROW_MULTIPLE
                # masked keys past a class are exact here (torch's route; the prompt
                # kernel's rows depend on their own keys alone: no padding)
                if m.padded_extents.values and not m.prompt_kernel:
                    m.prompt_key_multiple = PROMPT_KEY_MULTIPLE
        m.decode_layers = layers_kernel(config, m, loaded.device)
        # decode rows attend over extent classes (models/attention.py): torch's attention
        # on GEMMs whose summation order follows the extent
        self.extent_classes = bool(m.fixed_decode_rows) and not m.attention_kernel
        self.cache = KVCache(
            m.num_layers,
            config.max_batch_size,
            m.num_kv_heads,
            max_seq_len,
            m.head_dim,
            m.dtype,
            loaded.device,
            fixed_layout=static_decode,
            ring_layers=frozenset(i for i, w in enumerate(m.layers) if w.window is not None),
            ring=self._ring(config.prefill_chunk, max_seq_len)
            if config.sliding_window_kv == "ring"
            else None,
            headroom=m.attention_kernel,
        )
        self.module_shapes = module_shapes(m)
        self.lora = LoraSlots(
            m.num_layers,
            self.module_shapes,
            config.max_loras,
            config.max_lora_rank,
            lora_dtype(m),
            loaded.device,
            groups=m.LORA_GROUPS,
            # the int8 pairs run on torch's CPU kernel
            rowwise_decode=m.weights != "dense"
            and is_cpu(loaded.device)
            and rowwise_supported(self.module_shapes),
            prompt_dtype=m.dtype,  # prompt chunks: the compute dtype's GEMMs (see there)
        )
        self.adapter_slots = AdapterSlotTable(self.lora)
        self.graphs = None
        if static_decode:  # captured where the device is CUDA, else run as they would be
            capture = str(loaded.device).startswith("cuda")
            self.graphs = GraphedDecode(m, self.cache, self.lora, capture=capture)
        self.slots: list[Sequence] = []  # index = KV slot = decode row
        self.prefix_cache = None
        if config.prefix_cache_mb > 0 and m.rows_independent:  # exact reuse needs both
            self.prefix_cache = PrefixCache(
                self.cache, self.cache.bucket_size, config.prefix_cache_mb * 2**20
            )
        logger.info(
            "compact runner on %s: %s; KV cache %.0f MiB, LoRA buffers %.0f MiB",
            detect().describe(),
            ", ".join(f"{k} {v}" for k, v in self.kernels().items()),
            self.cache.nbytes / 2**20,
            self.lora.nbytes / 2**20,
        )

    def _ring(self, prefill_chunk: int, max_len: int) -> int | None:
        """The KV positions a sliding-window layer keeps (KVCache): its window plus one
        prompt chunk, rounded up to the extents attention reads (an extent class where rows
        attend over classes), so no chunk overwrites a key its own queries need."""
        windows = [w.window for w in self.model.layers if w.window is not None]
        if not windows:
            return None
        need = max(windows) + prefill_chunk
        if self.extent_classes:
            return extent_class(need, max_len)
        step = self.model.prompt_key_multiple or 16  # a ring's extent is one prompts read
        return min(-(-need // step) * step, max_len)

    def kernels(self) -> dict[str, str]:
        """What this runner computes with, for the start-up log and the engine info metric."""
        m = self.model
        return {
            "runner": "compact",
            "family": type(m).__name__.removesuffix("Model").lower(),
            "dtype": dtype_name(m.dtype),
            "weights": weights_label(m.weights),
            "head": type(m.lm_head).__name__,
            "rows_independent": str(m.rows_independent).lower(),
            # what decode rows of different extent classes share (models/attention.py)
            "decode_attention": "kernel" if m.attention_kernel else "torch",
            "prompt_attention": "kernel" if m.prompt_kernel else "torch",
            # a decode step's layers in one call (engine/decode_layers.py) or one by one
            "decode_layers": "kernel" if m.decode_layers is not None else "python",
            "extent_sharing": describe_sharing(m.padded_extents) if self.extent_classes else "n/a",
            "prefix_cache": "on" if self.prefix_cache is not None else "off",
            "prefill_rows": str(m.fixed_prefill_rows or "any"),
            # prompt chunks' dense GEMMs: one call a chunk, or fixed row blocks (prompt_gemm.py)
            "prompt_gemm": prompt_blocks(m) if m.row_blocks else "plain",
            # sliding-window layers' KV: a ring of this many positions, or the whole length
            "window_kv": f"ring {self.cache.ring}" if self.cache.ring else "full",
            "decode_graphs": self.graphs.describe() if self.graphs is not None else "off",
            # decode's LoRA products (engine/lora_rowwise.py)
            "lora_decode": "int8-rowwise"
            if self.lora.rowwise_decode
            else dtype_name(self.lora.dtype),
        }

    def can_admit(self, seq: Sequence) -> bool:
        if len(self.slots) >= self.cache.num_slots:
            return False
        adapter = seq.request.adapter
        return adapter is None or self.adapter_slots.can_acquire(adapter)

    def add(self, seq: Sequence) -> None:
        """Give the sequence the next slot, starting from its longest cached prompt prefix."""
        seq.slot = len(self.slots)
        seq.cache_len = 0
        self.cache.ensure_slots(seq.slot + 1, rows=len(self.slots))
        # prompt logprobs need every prompt row computed: no restore (vLLM does the same)
        if self.prefix_cache is not None and seq.params.prompt_logprobs is None:
            seq.cache_len = self.prefix_cache.restore(
                seq.request.prompt_ids, prefix_namespace(seq), seq.slot, len(self.slots)
            )
        adapter = seq.request.adapter
        seq.lora_slot = -1 if adapter is None else self.adapter_slots.acquire(adapter)
        self.slots.append(seq)

    def prefill(self, seqs: list[Sequence]) -> list[torch.Tensor | None]:
        """Run the next prompt chunk of each sequence, sharing forwards where the model
        allows; each sequence gets its [vocab] logits once its whole prompt is in, else None.
        On an exception no sequence has advanced."""
        chunks = [self._chunk(seq) for seq in seqs]
        # the whole prompts, not this chunk's end: a long prompt (or several, taking turns)
        # would otherwise re-lay the cache out at every chunk
        longest = max(seq.prompt_len for seq in seqs)
        self.cache.reserve(self.model.prompt_keys(longest, self.max_seq_len), len(self.slots))
        logits: list[torch.Tensor | None] = [None] * len(seqs)
        ring = self.cache.ring
        if self.prefix_cache is not None and ring is not None:
            for seq, chunk in zip(seqs, chunks, strict=True):
                if seq.prompt_len >= ring and chunk.start:  # blocks the ring will lose later
                    prompt = seq.request.prompt_ids[: chunk.start]
                    self.prefix_cache.store(prompt, prefix_namespace(seq), seq.slot)
        for group in self.model.prefill_groups(chunks):
            rows = self.model.prefill([chunks[i] for i in group], self.cache, self.lora)
            for row, i in enumerate(group):
                logits[i] = rows[row]
        for i, (seq, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            if chunk.scores is not None:
                seq.add_prompt_logprobs(chunk.targets, chunk.scores)
            seq.cache_len += len(chunk.tokens)
            if seq.cache_len < seq.prompt_len:
                logits[i] = None
            elif self.prefix_cache is not None:
                self.prefix_cache.store(seq.request.prompt_ids, prefix_namespace(seq), seq.slot)
        return logits

    def _chunk(self, seq: Sequence) -> PromptChunk:
        """The sequence's next prompt chunk; where the request asks for prompt logprobs, the
        prompt tokens its rows predict (the last prompt row predicts the first output token,
        which the sampler's logprobs cover)."""
        prompt = seq.request.prompt_ids
        start, end = seq.cache_len, seq.cache_len + self._chunk_length(seq)
        chunk = PromptChunk(
            prompt[start:end], start, seq.slot, seq.lora_slot, seq.prompt_len > WIDE_ROWS
        )
        top = seq.params.prompt_logprobs
        if top is not None:
            chunk.targets, chunk.top = prompt[start + 1 : end + 1], top
            chunk.ranks = seq.params.prompt_ranks
        return chunk

    def _chunk_length(self, seq: Sequence) -> int:
        """engine.prefill_chunk tokens, one fewer where that would leave a last chunk of one
        token: no prompt row is computed alone unless the whole prompt is one token."""
        remaining = seq.prompt_len - seq.cache_len
        take = min(self.prefill_chunk, remaining)
        return take - 1 if remaining - take == 1 else take

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each of `seqs` (all fully prefilled); returns [len(seqs), vocab]."""
        rows = len(self.slots)
        tokens = [0] * rows
        positions = [0] * rows
        # Rows still prefilling ride along: they attend to position 0 and write their K/V at
        # their next unfilled position, which their next prompt chunk overwrites before any
        # attention reads it; their outputs are dropped.
        writes = [s.cache_len for s in self.slots]
        lora_rows = [-1] * rows
        for seq in seqs:
            tokens[seq.slot] = seq.last_token
            positions[seq.slot] = seq.cache_len
            lora_rows[seq.slot] = seq.lora_slot
        # sequences still prefilling keep room for their whole prompt (see prefill)
        prompts = [
            self.model.prompt_keys(s.prompt_len, self.max_seq_len)
            for s in self.slots
            if s.cache_len < s.prompt_len
        ]
        longest = max([max(writes) + 1, *prompts])
        logits = None
        if self.graphs is not None and self.graphs.covers(lora_rows):
            # the decoding rows' keys alone: the cache does not move, so rows still
            # prefilling may write past them, and no row's extent depends on a neighbour's
            keys = max(positions[s.slot] for s in seqs) + 1
            logits = self.graphs.step(tokens, positions, writes, lora_rows, keys)
        if logits is None:
            logits = self._decode_eager(tokens, positions, writes, lora_rows, longest)
        device = self.device
        for seq in seqs:
            seq.cache_len += 1
        order = [s.slot for s in seqs]
        if order == list(range(len(order))):  # the usual case: no row is still prefilling
            return logits[: len(order)]
        return logits[torch.tensor(order, device=device)]

    def _decode_eager(
        self,
        tokens: list[int],
        positions: list[int],
        writes: list[int],
        lora_rows: list[int],
        longest: int,
    ) -> torch.Tensor:
        if self.extent_classes:  # rows attend over their own extent class
            longest = self.cache.extent_class(longest)
        self.cache.fit(longest, len(self.slots))
        device = self.device
        lora = None
        if any(s >= 0 for s in lora_rows):
            lora = self.lora.batch(torch.tensor(lora_rows, device=device), decode=True)
        return self.model.decode(
            torch.tensor(tokens, device=device),
            torch.tensor(positions, device=device),
            torch.tensor(writes, device=device),
            self.cache,
            lora,
        )

    def release(self, seq: Sequence) -> None:
        """Free the sequence's slot and keep rows dense. Where rows attend over extent
        classes (`fixed_decode_rows`), the slots after it move down one, keeping admission
        order (longest first), so each class stays a run of neighbouring slots that decode
        reads in place; copying a class's keys out every layer of every step cost ~15 % of a
        ragged c=16 step. Elsewhere the last slot's sequence moves into the hole.

        A sequence that ended abnormally may have left NaN/Inf in its cache (non-finite
        logits, or aborted between prompt chunks before they were checked): its slot is
        zeroed first. A normal finish had finite logits at every step, so its cache is clean.
        """
        slot = seq.slot
        if slot is None or slot >= len(self.slots) or self.slots[slot] is not seq:
            return
        if seq.finish_reason in ("error", "abort"):  # + 1: a decode that failed mid-way
            self.cache.clear(slot, seq.cache_len + 1)
        if self.extent_classes:
            after = self.slots[slot + 1 :]
            if after:
                length = max(1, *(s.cache_len for s in after))
                self.cache.shift_down(slot + 1, len(self.slots), length)
            del self.slots[slot]
            for index in range(slot, len(self.slots)):
                self.slots[index].slot = index
        else:
            last = self.slots.pop()
            if last is not seq:
                self.cache.move(last.slot, slot, max(last.cache_len, 1))
                last.slot = slot
                self.slots[slot] = last
        if seq.lora_slot >= 0:
            self.adapter_slots.release(seq.lora_slot)
        seq.slot = None


def prefix_namespace(seq: Sequence) -> str:
    """What besides the tokens decides whether a prompt's cached K/V may be reused: its
    adapter and kernel class (they change the K/V), and its tenant (server/tenancy.py: one
    API key must not learn another's prompts from how fast they come back)."""
    request = seq.request
    adapter = request.adapter.key if request.adapter is not None else ""
    return f"{adapter}|{seq.prompt_len > WIDE_ROWS}|{request.cache_namespace}"


def prompt_blocks(model: DecoderModel) -> str:
    """The prompt GEMMs' row blocks, for the start-up log and the engine info metric."""
    sizes = sorted({weight.block for layer in wide_weights(model) for weight in layer})
    return "blocks of " + "/".join(str(size) for size in sizes)


def build_runner(
    loaded: LoadedModel, config: EngineConfig, max_seq_len: int, team_may_shrink: bool = False
):
    family, reason = model_class(loaded.model.config)
    if family is not None:
        return CompactRunner(loaded, config, max_seq_len, family, team_may_shrink=team_may_shrink)
    logger.warning(
        "compact engine does not support %s; using the serial fallback (no LoRA)", reason
    )
    return HFModelRunner(loaded, config, max_seq_len)


__all__ = ["CompactRunner", "build_runner"]
