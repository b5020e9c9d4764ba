"""Decode steps replayed from CUDA graphs.

Why: on a GPU a small model's decode step waits on the host, not on arithmetic. A 1.1B Llama
step launches ~800 kernels at ~11 µs each (8.5 ms at one row, 9.1 ms at 64, where reading
its bf16 weights once takes ~0.7 ms). A CUDA graph records the step's kernels once and
replays them with one launch.

A graph replays fixed shapes and addresses, so the step it records is
`DecoderModel.decode_static`: inputs in one static buffer, the cache at a fixed layout,
every row attending over a fixed number of keys and (when any row uses an adapter) every
LoRA slot applied to every row, masked. One graph is captured per (rows, keys, LoRA on/off),
on first use; replaying it on the live inputs is the step.

Rows: where the device's GEMMs give a row the same bits at any row count
(`rows_independent`), steps round their rows up to a power of two; where they do not (GPUs:
cuBLAS picks kernels by size), every step runs `fixed_decode_rows` rows, so a request's tokens
never depend on how many neighbours it had (a one-row step then costs the full batch's,
which on a GPU is about the same). Keys: lengths in powers of two from 128 where this
device's start-up check found attention exact over a longer masked extent
(`padded_extents`), else the cache's whole length.

Steps with a sparse adapter in the batch run eagerly (their kernels are chosen per step), and
so do all steps after a failed capture (logged, and in the engine info metric). An eager step
computes LoRA and attention extents another way, so while a sparse adapter shares the batch
the other rows' tokens are not guaranteed the bits the graphed steps give them: the one
exception to batch invariance on a GPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.kv_cache import KVCache
    from server.engine.lora import LoraSlots
    from server.engine.models.base import DecoderModel

logger = logging.getLogger(__name__)

SHORTEST_KEYS = 128


def row_buckets(model: DecoderModel, num_slots: int) -> list[int]:
    """The row counts steps run on (see the module's docstring)."""
    if model.fixed_decode_rows:
        return [model.fixed_decode_rows]
    buckets = [1]
    while buckets[-1] < num_slots:
        buckets.append(min(num_slots, buckets[-1] * 2))
    return buckets


def key_lengths(model: DecoderModel, max_len: int) -> list[int]:
    """The key extents steps attend over (see the module's docstring)."""
    padded = model.padded_extents
    if model.fixed_decode_rows and not (padded.values and padded.up_to >= max_len):
        return [max_len]
    lengths = []
    length = SHORTEST_KEYS
    while length < max_len:
        lengths.append(length)
        length *= 2
    return [*lengths, max_len]


class GraphedDecode:
    """Captures and replays `decode_static` steps. `capture=False` runs the same static steps
    eagerly (CPUs, and tests of the arithmetic the graphs record)."""

    def __init__(self, model: DecoderModel, cache: KVCache, lora: LoraSlots, capture: bool = True):
        if not cache.fixed_layout:
            raise ValueError("captured decode steps need a KV cache of fixed layout")
        self.model = model
        self.cache = cache
        self.lora = lora
        self.capture = capture
        self.rows = row_buckets(model, cache.num_slots)
        self.lengths = key_lengths(model, cache.max_len)
        self.inputs = {
            rows: torch.zeros(4, rows, dtype=torch.long, device=cache.device) for rows in self.rows
        }
        # (rows, keys, lora) -> (graph, its output); graph None where not captured
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph | None, torch.Tensor]]
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.failure: str | None = None  # why capture failed, after which steps run eagerly

    def describe(self) -> str:
        """For the start-up log and the engine info metric."""
        if self.failure:
            return f"off ({self.failure})"
        mode = "cuda-graphs" if self.capture else "static"
        return f"{mode} rows={','.join(map(str, self.rows))} keys<={self.lengths[-1]}"

    def covers(self, row_slots: list[int]) -> bool:
        """Whether this step can replay a graph: no capture failed, no sparse adapter in it."""
        return self.failure is None and not (set(row_slots) & set(self.lora.sparse))

    @torch.inference_mode()
    def step(
        self,
        tokens: list[int],
        positions: list[int],
        writes: list[int],
        row_slots: list[int],
        longest: int,  # every decoding row's keys fit in this many (writes go anywhere)
    ) -> torch.Tensor | None:
        """[len(tokens), vocab] float32 logits, or None where capture failed (then this
        step has not run, and `covers` is false from now on)."""
        real = len(tokens)
        rows = next(r for r in self.rows if r >= real)
        length = next(n for n in self.lengths if n >= longest)
        pad = rows - real
        host = torch.tensor(
            [tokens + [0] * pad, positions + [0] * pad, writes + [0] * pad, row_slots + [-1] * pad]
        )
        self.inputs[rows].copy_(host)
        key = (rows, length, any(s >= 0 for s in row_slots))
        if key not in self.graphs:
            stream = torch.cuda.current_stream() if self.capture else None
            try:
                self.graphs[key] = self._capture(key)
            except RuntimeError as error:  # the step itself has not run: eager takes it
                if stream is not None:  # an invalidated capture can leave its stream current
                    torch.cuda.set_stream(stream)
                    torch.cuda.synchronize()
                self.failure = f"capture failed: {str(error).splitlines()[0][:200]}"
                logger.warning("decode graphs off: %s", self.failure)
                return None
        graph, out = self.graphs[key]
        if graph is None:
            out = self._run(key)
        else:
            graph.replay()
        return out[:real].clone()

    def _run(self, key: tuple[int, int, bool]) -> torch.Tensor:
        rows, length, lora = key
        return self.model.decode_static(
            self.inputs[rows], self.cache, length, self.lora if lora else None
        )

    def _capture(
        self, key: tuple[int, int, bool]
    ) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor]:
        """Warm up on a side stream (cuBLAS's workspaces, the allocator), then record. Both
        run the step on the live inputs: its K/V writes are the same values at the same
        places each time, so running it again is harmless."""
        if not self.capture:
            return None, torch.empty(0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(key)
        logger.info("captured a decode graph: rows=%d keys=%d lora=%s", *key)
        return graph, out
