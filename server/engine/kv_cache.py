"""Preallocated-per-layer KV cache with one slot per running sequence.

Running sequences always occupy slots 0..batch-1, so a decode step reads the cache as one
strided view with no gather; when a sequence leaves, the last one moves into its slot (or,
where rows attend over extent classes, the later slots move down one: runner.release).
Keys are stored transposed ([head_dim, positions] per head): the decode score GEMM q·Kᵀ then
reads K in the layout the batched GEMM wants, 2.5x faster than a transposed view at 16 rows
x 192 positions, with bit-identical results.

The position axis is only as long as the running sequences need (its capacity, rounded up to
a bucket), not `max_len`: oneDNN's batched GEMM copies any input that is not one contiguous
block before it multiplies, and a decode step's view (slots 0..batch-1, every position) is
contiguous only when it spans the whole axis. The copies cost 84 µs a layer at 16 rows x 160
positions; changing the capacity copies the cache once, every bucket's worth of steps at most.
The slot axis likewise holds the running sequences (rounded up to a power of two), not
`num_slots`: re-laying out 16 slots x every layer when one sequence runs cost 6 ms every 16
steps (5 % of a single stream's time), all of it zeros.

With `fixed_layout` (decode steps replayed from CUDA graphs, engine/cuda_graphs.py) the cache
is laid out once at its full size, every slot at `max_len`, and never moves: a captured graph
reads and writes the addresses it was captured with. GPUs' batched GEMMs take a strided view
as it is, so a step reads the keys it needs in place.

Sliding-window layers (`ring_layers`) keep only a ring of `ring` positions, the window plus
one prompt chunk: position p lives at index p % ring, so a long sequence's cache in those
layers stops growing at the ring (Gemma 3 270M: 15 of its 18 layers). Attention reads the
ring in index order and masks by how far back each index's latest position lies
(`DecoderModel.mask`); masked keys weigh exactly zero, so what a query sees is its window,
whatever older or newer positions share the ring. A prompt chunk of at most `ring - window
+ 1` tokens never overwrites a key one of its own queries still needs. Below the ring's
length nothing wraps and the layout is the plain one. Not with `fixed_layout` (the graphs'
masks are built for the plain layout).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
        bucket_size: int = 16,
        fixed_layout: bool = False,
        ring_layers: frozenset[int] = frozenset(),
        ring: int | None = None,
        headroom: bool = False,
    ):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.bucket_size = bucket_size
        self.capacity = 0
        self.slot_capacity = 0  # the slot axis: running sequences, rounded up to a power of 2
        self.resizes = 0  # how often the position axis was re-laid out (bench/decode_step.py)
        self.keys_t: list[torch.Tensor] = []  # per layer [slots, kv_heads, d, capacity]
        self.values: list[torch.Tensor] = []  # per layer [slots, kv_heads, capacity, d]
        self.fixed_layout = fixed_layout
        # Where decode reads the cache through a stride (the attention kernel), `fit` leaves
        # room to grow and shrinks only to half: a full-width layout saves torch's route a
        # copy, but re-laying every layer out each bucket, up and down as the longest
        # sequence of a busy batch comes and goes, cost the kernel's route ~2 % of a step
        self.headroom = headroom
        if ring is not None and (fixed_layout or ring >= max_len):
            ring = None  # a ring as long as the cache saves nothing
        self.ring = ring
        self.ring_layers = ring_layers if ring is not None else frozenset()
        if fixed_layout:
            self._resize(max_len, rows=0, slots=num_slots)
        else:
            self._resize(self.bucket(1), rows=0)

    @property
    def nbytes(self) -> int:
        """The most the cache can take: every slot at max_len positions (a ring layer at
        its ring)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_position = self.num_slots * self.num_kv_heads * self.head_dim * itemsize
        ringed = len(self.ring_layers)
        positions = (self.num_layers - ringed) * self.max_len + ringed * (self.ring or 0)
        return 2 * per_position * positions

    def ringed(self, layer: int) -> bool:
        return layer in self.ring_layers

    def ring_for(self, window: int | None) -> int | None:
        """The ring a layer with this sliding window keeps, or None (every position): the
        one place attention's masks and extents learn whether to read a ring."""
        return self.ring if window is not None and self.ring_layers else None

    def keys_in(self, length: int, ringed: bool) -> int:
        """The keys a layer holds for sequences of up to `length` positions: `length`, or
        for a ring layer at most the ring (what attention reads there, in index order)."""
        return min(length, self.ring) if ringed and self.ring is not None else length

    def _index(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        return positions % self.ring if layer in self.ring_layers else positions  # type: ignore[operator]

    def bucket(self, length: int) -> int:
        """Length rounded up, so shapes repeat across steps (masking hides the rest); small
        buckets, since every row of a decode step reads the batch's longest length."""
        rounded = -(-length // self.bucket_size) * self.bucket_size
        return min(rounded, self.max_len)

    def extent_class(self, length: int) -> int:
        """A key extent set by one sequence's own length alone (see `extent_class`)."""
        return extent_class(length, self.max_len)

    def slots_for(self, rows: int) -> int:
        """The slot axis for `rows` running sequences: the next power of two, so that a batch
        filling up one sequence at a time re-lays the cache out log2(num_slots) times."""
        return min(self.num_slots, 1 << max(rows - 1, 0).bit_length())

    def fit(self, length: int, rows: int) -> None:
        """Make the capacity bucket(length), keeping slots 0..rows-1 (whose sequences must
        all fit in `length`): grows as sequences lengthen, shrinks when long ones leave (and
        the slot axis with it, to the running sequences). With `headroom`, it grows to a
        quarter more than needed and shrinks once it holds more than twice what is."""
        capacity = self.bucket(length)
        if self.fixed_layout or capacity == self.capacity:
            return
        if self.headroom:
            if capacity <= self.capacity <= 2 * capacity:
                if self.slot_capacity > self.slots_for(rows):  # the slot axis still follows
                    self._resize(self.capacity, rows)
                return
            capacity = self.bucket(capacity + capacity // 4)
        self._resize(capacity, rows)

    def reserve(self, length: int, rows: int) -> None:
        """Grow (never shrink) so that `length` positions fit, keeping slots 0..rows-1."""
        if length > self.capacity and not self.fixed_layout:
            self._resize(self.bucket(length), rows, self.slot_capacity)

    def ensure_slots(self, count: int, rows: int) -> None:
        """Make slots 0..count-1 usable, keeping slots 0..rows-1."""
        if count > self.slot_capacity and not self.fixed_layout:
            self._resize(self.capacity, rows, self.slots_for(count))

    def _resize(self, capacity: int, rows: int, slots: int | None = None) -> None:
        """New zeroed buffers (positions no sequence has written must hold finite values:
        masked attention still multiplies them by zero), one layer at a time so the
        transient extra memory is one layer's. `slots`: the new slot axis (at least `rows`),
        by default the running sequences' power of two."""
        slots = max(slots or 0, self.slots_for(rows))
        heads, d = self.num_kv_heads, self.head_dim
        for layer in range(self.num_layers):
            ringed = self.ringed(layer)
            size = self.keys_in(capacity, ringed)  # a ring layer: nothing past the ring
            keep = min(size, self.keys_in(self.capacity, ringed))
            keys_t = torch.zeros((slots, heads, d, size), dtype=self.dtype, device=self.device)
            values = torch.zeros((slots, heads, size, d), dtype=self.dtype, device=self.device)
            if rows and keep:
                keys_t[:rows, ..., :keep] = self.keys_t[layer][:rows, ..., :keep]
                values[:rows, :, :keep] = self.values[layer][:rows, :, :keep]
            if layer < len(self.keys_t):
                self.keys_t[layer], self.values[layer] = keys_t, values
            else:
                self.keys_t.append(keys_t)
                self.values.append(values)
        self.capacity = capacity
        self.slot_capacity = slots
        self.resizes += 1

    def write_prompt(
        self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [tokens, kv_heads, d] for positions start..start+tokens (within capacity;
        a ring layer's at their ring index)."""
        end = start + k.shape[0]
        if self.ringed(layer) and end > self.ring:  # type: ignore[operator]
            index = torch.arange(start, end, device=self.device) % self.ring  # type: ignore[operator]
            self.keys_t[layer][slot, :, :, index] = k.permute(1, 2, 0)
            self.values[layer][slot, :, index] = v.transpose(0, 1)
            return
        self.keys_t[layer][slot, :, :, start:end] = k.permute(1, 2, 0)
        self.values[layer][slot, :, start:end] = v.transpose(0, 1)

    def prompt_view(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's keys_t [kv_heads, d, keys] and values [kv_heads, keys, d], keys =
        keys_in(end) (a ring layer: at most its ring)."""
        end = self.keys_in(end, self.ringed(layer))
        return self.keys_t[layer][slot, :, :, :end], self.values[layer][slot, :, :end]

    def write_decode(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """k, v: [batch, kv_heads, d]; row i writes slot i at positions[i]."""
        positions = self._index(layer, positions)
        self.keys_t[layer][rows, :, :, positions] = k
        self.values[layer][rows, :, positions] = v

    def batch_view(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys_t [batch, kv_heads, d, keys] and values [batch, kv_heads, keys, d], keys =
        keys_in(length): contiguous when that is the layer's whole position axis."""
        length = self.keys_in(length, self.ringed(layer))
        return self.keys_t[layer][:batch, ..., :length], self.values[layer][:batch, :, :length]

    def values_view(self, layer: int, rows: torch.Tensor | slice, length: int) -> torch.Tensor:
        """values [rows, kv_heads, keys, d] of some slots: in place for a slice."""
        return self.values[layer][rows, :, : self.keys_in(length, self.ringed(layer))]

    def _layers(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every layer's buffers with how much of them `length` positions occupy."""
        return [
            (keys_t, values, self.keys_in(length, self.ringed(layer)))
            for layer, (keys_t, values) in enumerate(zip(self.keys_t, self.values, strict=True))
        ]

    def clear(self, slot: int, length: int) -> None:
        """Zero a slot's first `length` positions: a NaN or Inf left there by a sequence that
        ended abnormally would turn a later occupant's masked attention into NaN."""
        for keys_t, values, held in self._layers(length):
            keys_t[slot, ..., :held] = 0
            values[slot, :, :held] = 0

    def shift_down(self, start: int, stop: int, length: int) -> None:
        """Move slots start..stop-1 one slot down (into start-1..stop-2), their first `length`
        positions, all layers: the hole a sequence left is closed and slot order is kept."""
        for keys_t, values, held in self._layers(length):
            keys_t[start - 1 : stop - 1, ..., :held] = keys_t[start:stop, ..., :held].clone()
            values[start - 1 : stop - 1, :, :held] = values[start:stop, :, :held].clone()

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` positions from one slot to another (all layers)."""
        for keys_t, values, held in self._layers(length):
            keys_t[target, ..., :held] = keys_t[source, ..., :held]
            values[target, :, :held] = values[source, :, :held]

    def intact_from(self, written: int) -> int:
        """The first position every layer of a slot that has written positions
        0..written-1 still holds (a ring keeps its last ring - 1 positions: the next write,
        of position `written`, may already have taken the oldest one's index)."""
        return max(0, written - self.ring + 1) if self.ring_layers else 0  # type: ignore[operator]

    def read_positions(self, slot: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions first..end-1 of a slot, every layer: keys_t [layers, kv_heads, d, n] and
        values [layers, kv_heads, n, d] (they must be intact: intact_from)."""
        index = torch.arange(first, end, device=self.device)
        keys_t = [k[slot][..., self._index(layer, index)] for layer, k in enumerate(self.keys_t)]
        values = [v[slot][:, self._index(layer, index)] for layer, v in enumerate(self.values)]
        return torch.stack(keys_t), torch.stack(values)

    def write_positions(
        self, slot: int, keys_t: torch.Tensor, values: torch.Tensor, length: int
    ) -> None:
        """Positions 0..length-1 of a slot from read_positions' layout (a ring layer keeps
        the last ring of them)."""
        for layer in range(self.num_layers):
            first = length - self.keys_in(length, self.ringed(layer))
            index = self._index(layer, torch.arange(first, length, device=self.device))
            self.keys_t[layer][slot, ..., index] = keys_t[layer][..., first:length]
            self.values[layer][slot, :, index] = values[layer][:, first:length]


def extent_class(length: int, max_len: int) -> int:
    """A key extent set by one sequence's own length alone (64, 96, 128, 192, 256, ...: at
    most 1.5x the length, few distinct shapes, every one a multiple of 32 keys), for devices
    whose batched GEMMs may sum in another order when the extent changes (see
    server/engine/models/attention.py)."""
    size = 64
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, max_len)


def extent_classes(max_len: int) -> list[int]:
    """Every extent class up to max_len, shortest first."""
    classes = [extent_class(1, max_len)]
    while classes[-1] < max_len:
        classes.append(extent_class(classes[-1] + 1, max_len))
    return classes
