"""Reuse of prompt prefixes' K/V across requests (automatic prefix caching, as in vLLM).

Chat requests repeat their system prompt, RAG requests their instructions: the K/V of a prefix
is kept in blocks of `block_size` tokens, keyed by a SHA-256 chain over the adapter, the
prompt's kernel class and every token up to the block's end (a block is only reused after the
same tokens, so a collision would need a SHA-256 collision). A new prompt starts from its
longest cached run of blocks, copied into its KV slot, and prefills the rest.

Reuse is exact, not approximate: the compact forward gives a prompt's rows the same bits
however the prompt is cut into chunks (row-independent GEMMs, exact masked attention; see
DecoderModel.prefill), so a request's tokens do not depend on which requests came before it.
Where the GEMMs are not row-independent (checked at load) the cache stays off.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from server.engine.kv_cache import KVCache


class PrefixCache:
    def __init__(self, cache: KVCache, block_size: int, max_bytes: int):
        self.cache = cache
        self.block_size = block_size
        self.max_bytes = max_bytes
        itemsize = torch.empty((), dtype=cache.dtype).element_size()
        self.block_bytes = (
            2 * cache.num_layers * cache.num_kv_heads * cache.head_dim * block_size * itemsize
        )
        # chain key -> (keys_t [layers, kv_heads, d, block], values [layers, kv_heads, block, d])
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens restored instead of computed
        self.prompt_tokens = 0  # prompt tokens looked up

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def chain(self, tokens: list[int], namespace: str, blocks: int) -> list[bytes]:
        """Keys of the first `blocks` full blocks: each names everything before its end."""
        digest = hashlib.sha256(namespace.encode()).digest()
        keys = []
        for index in range(blocks):
            block = tokens[index * self.block_size : (index + 1) * self.block_size]
            digest = hashlib.sha256(digest + array("q", block).tobytes()).digest()
            keys.append(digest)
        return keys

    def restore(self, tokens: list[int], namespace: str, slot: int, rows: int) -> int:
        """Copy the longest cached run of leading blocks into `slot` (slots 0..rows-1 are in
        use); returns the tokens restored. At least two prompt tokens are left to compute: the
        last one's logits are needed, and no prompt row is computed alone (see PromptChunk)."""
        self.prompt_tokens += len(tokens)
        found = []
        for key in self.chain(tokens, namespace, max(len(tokens) - 2, 0) // self.block_size):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        if not found:
            return 0
        length = len(found) * self.block_size
        self.cache.reserve(length, rows)
        keys_t = torch.cat([k for k, _ in found], dim=-1)
        values = torch.cat([v for _, v in found], dim=-2)
        self.cache.write_positions(slot, keys_t, values, length)
        self.hit_tokens += length
        return length

    def store(self, tokens: list[int], namespace: str, slot: int) -> None:
        """Keep the full blocks of `tokens`, a prompt or the part of it that `slot` has
        written, least recently used blocks making room. Where sliding-window layers keep a
        ring (KVCache), the runner stores a long prompt's blocks before its next chunk
        overwrites them; blocks already gone are not stored, nor anything after them."""
        if self.max_bytes < self.block_bytes:
            return
        count = len(tokens) // self.block_size
        keys = self.chain(tokens, namespace, count)
        missing = [i for i, key in enumerate(keys) if key not in self._blocks]
        if not missing:
            for key in keys:
                self._blocks.move_to_end(key)
            return
        first, end = missing[0] * self.block_size, count * self.block_size
        if first < self.cache.intact_from(len(tokens)):
            return  # a block the ring has overwritten: no run from the start to add to
        keys_t, values = self.cache.read_positions(slot, first, end)
        for index, key in enumerate(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            lo = index * self.block_size - first
            hi = lo + self.block_size
            self._blocks[key] = (keys_t[..., lo:hi].clone(), values[:, :, lo:hi].clone())
        while self.nbytes > self.max_bytes:
            self._blocks.popitem(last=False)
