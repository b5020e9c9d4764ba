"""Model runners turn scheduled sequences into next-token logits; the only code that runs the
model. `CompactRunner` batches every running sequence (and its adapter) into one decode forward
of the model's family (server/engine/models/); `HFModelRunner` is the fallback for
architectures no family covers."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ragtune.config import EngineConfig
from ragtune.hardware import detect
from ragtune.models import LoadedModel
from ragtune.models.checkpoint import open_checkpoint
from server.engine import a8, attention_rows, decode_layers, native
from server.engine.cuda_graphs import GraphedDecode
from server.engine.kv_cache import KVCache, extent_class
from server.engine.linear import W8A8Linear, is_bnb, packed_weights_supported
from server.engine.lora import AdapterWeights, LoraSlots
from server.engine.lora_rowwise import rowwise_supported
from server.engine.models import (
    WIDE_ROWS,
    DecoderModel,
    PromptChunk,
    RowScores,
    model_class,
    module_shapes,
)
from server.engine.models.exactness import describe_sharing
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Where GEMMs depend on the row count on a CPU (AMX, MKL): prompt forwards' rows rounded up to
# this multiple, prompt attention's keys to this one (models/base.py). Measured on AMX with
# the bundled model: the last prompt row's logits after a prefill of n tokens and of n + 1
# (an echoed choice) were bit-identical for 30 of 39 lengths between 40 and 257 unpadded,
# 38 with the keys padded, 39 with both.
PREFILL_ROW_MULTIPLE = 16
PROMPT_KEY_MULTIPLE = 32


class AdapterSlotTable:
    """Which adapter occupies which LoRA slot; slots in use by running sequences are pinned,
    the others are reused least-recently-used first."""

    def __init__(self, lora: LoraSlots):
        self.lora = lora
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, LRU order
        self._users: dict[int, int] = {}  # slot -> running sequences using it
        self._free = list(range(lora.num_slots))

    def can_acquire(self, adapter: AdapterWeights) -> bool:
        if adapter.key in self._slot_of or self._free:
            return True
        return any(self._users.get(slot, 0) == 0 for slot in self._slot_of.values())

    def acquire(self, adapter: AdapterWeights) -> int:
        slot = self._slot_of.get(adapter.key)
        if slot is None:
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(k for k, s in self._slot_of.items() if self._users.get(s, 0) == 0)
                slot = self._slot_of.pop(victim)
            try:
                self.lora.load(slot, adapter)
            except Exception:
                self.lora.clear(slot)
                self._free.append(slot)
                raise
            self._slot_of[adapter.key] = slot
        self._slot_of.move_to_end(adapter.key)
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1

    def evict(self, key: str) -> None:
        """Drop an adapter's slot contents (after unload) once nothing running uses it."""
        slot = self._slot_of.get(key)
        if slot is not None and self._users.get(slot, 0) == 0:
            del self._slot_of[key]
            self.lora.clear(slot)
            self._free.append(slot)


class CompactRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        max_seq_len: int,
        family: type[DecoderModel] | None = None,  # default: the one for the model's config
        static_decode: bool | None = None,  # default: on CUDA with engine.cuda_graphs
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
        )
        self.device = loaded.device
        self.max_seq_len = max_seq_len
        self.prefill_chunk = config.prefill_chunk
        m = self.model
        if not m.rows_independent:
            m.fixed_decode_rows = config.max_batch_size
            if not is_cpu(loaded.device):  # padding a prompt forward is cheap beside launches
                m.fixed_prefill_rows = config.prefill_chunk
            else:  # see DecoderModel.prefill_row_multiple
                m.prefill_row_multiple = PREFILL_ROW_MULTIPLE
                if m.padded_extents.values:  # masked keys past a class are exact here
                    m.prompt_key_multiple = PROMPT_KEY_MULTIPLE
        if static_decode is None:
            static_decode = config.cuda_graphs and str(loaded.device).startswith("cuda")
        m.attention_kernel = attention_kernel(config, m, loaded.device, static_decode)
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
        return min(-(-need // 16) * 16, max_len)

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
            # a decode step's layers in one call (engine/decode_layers.py) or one by one
            "decode_layers": "kernel" if m.decode_layers is not None else "python",
            "extent_sharing": describe_sharing(m.padded_extents) if self.extent_classes else "n/a",
            "prefix_cache": "on" if self.prefix_cache is not None else "off",
            "prefill_rows": str(m.fixed_prefill_rows or "any"),
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


def lora_dtype(model: DecoderModel) -> torch.dtype:
    """The dtype of the LoRA GEMMs. Where decode already runs them on a fixed row count (the
    GEMMs' bits depend on it: AMX, MKL) and the device is a CPU, float32: MKL's small fp32
    GEMMs cost about half of oneDNN's bf16 ones at LoRA sizes (AMX Xeon, one thread: 31 vs
    52 µs for the qkv group's pair), and a rank-r product is cheap in any dtype. Prompt
    chunks there use bf16 copies of the factors (LoraSlots.prompt_dtype): at hundreds of
    rows the fp32 GEMMs and their casts cost more than the base prefill's own GEMMs.
    Elsewhere the compute dtype, whose GEMMs were checked row-independent at start-up, so
    prompt rows stay independent of chunking (the prefix cache relies on it)."""
    if not model.rows_independent and model.device == "cpu":
        return torch.float32
    return model.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(
        dtype, str(dtype)
    )


def prefix_namespace(seq: Sequence) -> str:
    """What besides the tokens decides whether a prompt's cached K/V may be reused: its
    adapter and kernel class (they change the K/V), and its tenant (server/tenancy.py: one
    API key must not learn another's prompts from how fast they come back)."""
    request = seq.request
    adapter = request.adapter.key if request.adapter is not None else ""
    return f"{adapter}|{seq.prompt_len > WIDE_ROWS}|{request.cache_namespace}"


def decode_weights(config: EngineConfig, loaded: LoadedModel) -> str:
    """engine.weights resolved for this model. 'auto', on a CPU (bf16 or fp32 compute) where
    ragtune's a8 kernel builds: w4a8 where the checkpoint's layers already lie on a 4-bit
    grid (a Q4_0/Q4_1 GGUF: nothing lost), else w8a8 (5- to 16-bit checkpoints keep 8 bits);
    int4 on torch's kernel where the a8 kernel cannot run (the reason in the log); dense on
    GPUs (int4 is an opt-in there, measured in docs/performance.md)."""
    kind, dtype, device = config.weights, loaded.dtype, loaded.device
    if kind == "auto":
        if not (is_cpu(device) and packed_weights_supported("int4", dtype, device)):
            return "dense"
        if (reason := native.unavailable_reason()) is not None:
            logger.warning("engine.weights auto: int4, as the a8 kernel cannot run: %s", reason)
            return "int4"
        return "w4a8" if checkpoint_on_4bit_grid(loaded) else "w8a8"
    if kind != "dense" and not packed_weights_supported(kind, dtype, device):
        raise ValueError(
            f"engine.weights={kind} needs bf16 or fp32 compute on a CPU, or (int4 only) bf16 "
            f"on a CUDA GPU (not {dtype} on {device})"
        )
    if kind == "w8a8" and not W8A8Linear.supported():
        raise ValueError("engine.weights=w8a8 needs oneDNN's int8 linear, which this torch lacks")
    if kind == "w4a8" and (reason := native.unavailable_reason()) is not None:
        raise ValueError(f"engine.weights=w4a8 cannot run here: {reason}")
    return kind


def attention_kernel(
    config: EngineConfig, model: DecoderModel, device: str, fixed_layout: bool
) -> bool:
    """engine.decode_attention resolved: whether decode steps attend on ragtune's kernel
    (engine/attention_rows.py). 'auto' takes it wherever it runs, saying why not on a CPU
    where it cannot; 'kernel' where it cannot is an error."""
    if config.decode_attention == "torch":
        return False
    reason = attention_rows.unsupported_reason(model, device, fixed_layout)
    if reason is not None and config.decode_attention == "kernel":
        raise ValueError(f"engine.decode_attention=kernel cannot run here: {reason}")
    if reason is not None and is_cpu(device):
        logger.warning("decode attention on torch's GEMMs: %s", reason)
    return reason is None


def layers_kernel(
    config: EngineConfig, model: DecoderModel, device: str
) -> decode_layers.DecodeLayers | None:
    """engine.decode_layers resolved: a step's layers in one kernel call where it runs
    (engine/decode_layers.py), saying why not on a CPU where it cannot; 'kernel' where it
    cannot is an error."""
    if config.decode_layers == "python" or not is_cpu(device):
        if config.decode_layers == "kernel":
            raise ValueError(f"engine.decode_layers=kernel runs on a CPU, not {device}")
        return None
    reason = decode_layers.unsupported_reason(model)
    if reason is None:
        try:
            return decode_layers.DecodeLayers(model)
        except RuntimeError as error:  # its GLU check against torch failed here
            reason = str(error)
    if config.decode_layers == "kernel":
        raise ValueError(f"engine.decode_layers=kernel cannot run here: {reason}")
    logger.info("decode layers one call at a time: %s", reason)
    return None


def weights_label(kind: str) -> str:
    """The decode weights and the kernel that multiplies them, for logs and metrics."""
    if kind == "w4a8" or (kind == "w8a8" and native.unavailable_reason() is None):
        return f"{kind} ({native.isa()})"
    return "w8a8 (onednn)" if kind == "w8a8" else kind


def checkpoint_on_4bit_grid(loaded: LoadedModel) -> bool:
    """Whether the first layer's projections, as the packed kinds read them (the checkpoint
    file, else the loaded weights), all lie on the 4-bit grid (a8.lies_on_4bit_grid)."""
    source = open_checkpoint(loaded.model_dir)
    if source is not None:
        names = [k for k in source if ".layers.0." in k and k.endswith("proj.weight")]
        weights = [source.tensor(name) for name in names]
    else:
        weights = [
            module.weight.detach()
            for name, module in loaded.model.named_modules()
            if ".layers.0." in f".{name}." and isinstance(module, torch.nn.Linear)
            and not is_bnb(module)
        ]  # fmt: skip
    fits = [w for w in weights if w.dim() == 2 and w.shape[1] % a8.GROUP == 0]
    return bool(fits) and all(a8.lies_on_4bit_grid(w) for w in fits)


def is_cpu(device) -> bool:
    return str(device).startswith("cpu")


def build_runner(loaded: LoadedModel, config: EngineConfig, max_seq_len: int):
    family, reason = model_class(loaded.model.config)
    if family is not None:
        return CompactRunner(loaded, config, max_seq_len, family)
    logger.warning(
        "compact engine does not support %s; using the serial fallback (no LoRA)", reason
    )
    return HFModelRunner(loaded, config, max_seq_len)


__all__ = ["AdapterSlotTable", "CompactRunner", "HFModelRunner", "build_runner"]
