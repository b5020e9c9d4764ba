"""A compact Llama forward for serving: batched decode and chunked prefill over a slot KV cache.

Why not the Hugging Face module: its cache is per batch, not per sequence, so sequences cannot
join and leave a running batch, and its per-step Python overhead dominates on small models.
The weights come from the loaded Hugging Face model (quantized ones dequantized once to the
compute dtype), q/k/v and gate/up are fused into one GEMM each, and every attention call uses
the same masked path whether a row runs alone or in a batch, which keeps greedy outputs
independent of batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.kv_cache import KVCache
from server.engine.lora import LoraBatch, LoraSlots

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
WIDE_ROWS = 32  # prompt chunks above this many tokens run int8 weights dequantized (see Int8Linear)


def supports(config) -> str | None:
    """None when this forward can run the model, else the reason it cannot."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention/MLP biases"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def dense_weight(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight of a plain or bitsandbytes-quantized linear layer, in `dtype`."""
    weight = linear.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        state = getattr(weight, "quant_state", None) or getattr(linear, "state", None)
        return dequantize_bnb_weight(weight, state=state).to(dtype).contiguous()
    return weight.detach().to(dtype).contiguous()


class DenseLinear:
    """y = x Wᵀ with W [out, in] in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight)


class Int8Linear:
    """Weight-only int8 (one scale per output channel), bf16 activations: decode on a CPU is
    bound by reading the weights, so half the bytes of bf16 is about half the time at small
    batches. The per-channel rounding error (<= 1/254 of a row's largest weight) is far below
    that of the NF4 grid the weights come from, and each row of the result is computed on its
    own whatever the batch size (measured), so outputs stay batch-invariant."""

    def __init__(self, weight: torch.Tensor):
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(weight.float() / scales[:, None]).to(torch.int8).contiguous()
        self.scales = scales.to(weight.dtype)

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """`wide`: many rows (a prompt chunk), where the GEMM is compute-bound and the packed
        kernel is slower than dequantizing on the fly for the dense one (512-token prefill:
        506 ms packed, 327 ms dequantized, 310 ms bf16). Decode rows never take this path,
        so a row's decode result does not depend on the batch size."""
        if wide:
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        return torch._weight_int8pack_mm(x.contiguous(), self.weight, self.scales)


Linear = DenseLinear | Int8Linear


def int8_supported(dtype: torch.dtype, device: str) -> bool:
    """The packed int8 kernel serves bf16 compute on CPUs; GPUs keep dense weights."""
    return dtype == torch.bfloat16 and str(device).startswith("cpu")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


class LlamaModel:
    """Weights plus the two forward passes the scheduler needs."""

    def __init__(self, hf_model, dtype: torch.dtype, device: str, int8_weights: bool = False):
        config = hf_model.config
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers

        inner = hf_model.model
        self.embed = inner.embed_tokens.weight.detach().to(dtype).contiguous()
        self.norm = inner.norm.weight.detach().to(dtype)
        self.int8_weights = int8_weights
        linear = Int8Linear if int8_weights else DenseLinear
        self.lm_head = linear(dense_weight(hf_model.lm_head, dtype))
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight.detach().to(dtype),
                    qkv=linear(
                        torch.cat(
                            [
                                dense_weight(attn.q_proj, dtype),
                                dense_weight(attn.k_proj, dtype),
                                dense_weight(attn.v_proj, dtype),
                            ]
                        ).contiguous()
                    ),
                    o=linear(dense_weight(attn.o_proj, dtype)),
                    post_norm=layer.post_attention_layernorm.weight.detach().to(dtype),
                    gate_up=linear(
                        torch.cat(
                            [dense_weight(mlp.gate_proj, dtype), dense_weight(mlp.up_proj, dtype)]
                        ).contiguous()
                    ),
                    down=linear(dense_weight(mlp.down_proj, dtype)),
                )
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self._cos, self._sin = self._rope_tables(hf_model, config.max_position_embeddings)

    def _rope_tables(self, hf_model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Reuse the model's own rotary module so every rope_scaling variant is handled.
        rotary = hf_model.model.rotary_emb
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = rotary(probe, positions)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)  # [positions, head_dim]

    # ------------------------------------------------------------------------------ helpers
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as LlamaRMSNorm: normalise in float32, scale in the compute dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _layer(
        self,
        index: int,
        x: torch.Tensor,  # [tokens, hidden]
        cos: torch.Tensor,  # [tokens, 1, head_dim]
        sin: torch.Tensor,
        attend,  # (layer, q [tokens, heads, d], k, v [tokens, kv_heads, d]) -> [tokens, q_size]
        lora: LoraBatch | None,
        wide: bool = False,  # a prompt chunk of more than WIDE_ROWS tokens
    ) -> torch.Tensor:
        w = self.layers[index]
        h = self._rms_norm(x, w.input_norm)
        qkv = w.qkv(h, wide)
        if lora is not None:
            lora.add(index, "qkv", h, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        tokens = x.shape[0]
        q = self._rotate(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = self._rotate(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        attn = attend(index, q, k, v)
        out = w.o(attn, wide)
        if lora is not None:
            lora.add(index, "o", attn, out)
        x = x + out
        h = self._rms_norm(x, w.post_norm)
        gate_up = w.gate_up(h, wide)
        if lora is not None:
            lora.add(index, "gate_up", h, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        down = w.down(act, wide)
        if lora is not None:
            lora.add(index, "down", act, down)
        return x + down

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms_norm(x, self.norm)).float()

    # ------------------------------------------------------------------------------ passes
    @torch.inference_mode()
    def prefill(
        self,
        tokens: list[int],
        start: int,
        slot: int,
        cache: KVCache,
        lora_slots: LoraSlots | None,
        lora_slot: int,
    ) -> torch.Tensor:
        """Run one chunk of a prompt (positions start..start+len) for one sequence.

        Returns [vocab] float32 logits of the chunk's last token.
        """
        count = len(tokens)
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.arange(start, start + count, device=self.device)
        x = self.embed[ids]
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        end = start + count
        # [count, end]: token i sees cache positions <= start + i
        mask = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        lora = None
        if lora_slots is not None and lora_slot >= 0:
            lora = lora_slots.batch(torch.full((count,), lora_slot, device=self.device))

        def attend(layer: int, q, k, v):
            cache.write_prompt(layer, slot, start, k, v)
            keys, values = cache.prompt_view(layer, slot, end)  # [kv_heads, end, d]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                keys[None],
                values[None],
                attn_mask=mask[None, None],
                scale=self.scale,
                enable_gqa=True,
            )  # [1, heads, count, d]
            return out[0].transpose(0, 1).reshape(count, self.q_size)

        for index in range(self.num_layers):
            x = self._layer(index, x, cos, sin, attend, lora, count > WIDE_ROWS)
        return self._logits(x[-1:])[0]

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

        A lone row is computed as two identical rows: on some CPUs oneDNN's one-row (GEMV)
        kernel sums in another order than its kernels for two or more rows, which would make
        a request's tokens depend on whether it had batch neighbours.
        """
        real = tokens.shape[0]
        if real == 1:
            tokens, positions = tokens.repeat(2), positions.repeat(2)
            lora = lora.repeat_rows(2) if lora is not None else None
        batch = tokens.shape[0]
        x = self.embed[tokens]
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        length = cache.bucket(int(positions.max()) + 1)
        rows = torch.arange(batch, device=self.device)
        hidden = ~(torch.arange(length, device=self.device)[None, :] <= positions[:, None])
        hidden = hidden[:, None, None, :]  # [batch, 1, 1, length]: True = not attended

        def attend(layer: int, q, k, v):
            cache.write_decode(layer, rows[:real], write_positions, k[:real], v[:real])
            keys, values = cache.batch_view(layer, real, length)  # [real, kv_heads, length, d]
            if batch > real:
                keys, values = keys.repeat(batch, 1, 1, 1), values.repeat(batch, 1, 1, 1)
            return self._decode_attention(q, keys, values, hidden)

        for index in range(self.num_layers):
            x = self._layer(index, x, cos, sin, attend, lora)
        return self._logits(x)[:real]

    def _decode_attention(
        self,
        q: torch.Tensor,  # [batch, heads, d]
        keys: torch.Tensor,  # [batch, kv_heads, length, d]
        values: torch.Tensor,
        hidden: torch.Tensor,  # [batch, 1, 1, length] True where a row must not look
    ) -> torch.Tensor:
        """One query token per row, as Hugging Face's eager attention computes it (scores in
        the compute dtype, softmax in float32). For a single query the CPU flash kernel is
        mostly overhead: 1.47 ms against 0.19 ms here at 16 rows x 256 keys. Each row is its
        own small GEMM and masked keys weigh exactly zero, so a row's result does not depend
        on its neighbours or on the padded length (checked in tests/engine)."""
        batch = q.shape[0]
        grouped = q.view(batch, self.num_kv_heads, -1, self.head_dim)  # heads sharing a kv head
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.scale
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        return torch.matmul(probs.to(q.dtype), values).reshape(batch, self.q_size)
