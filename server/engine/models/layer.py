"""What one decoder layer computes from its weights (`LayerWeights`), mixed into
`DecoderModel` beside the passes (passes.py): norms, the fused projections with their
adapters, rotary embedding, the residual stream, the vocabulary projection. Apart from the
weights and family hooks (base.py) because this is where kernel calls are fused: a
projection takes its norm before, its norm after and its residual add in one a8 call where
it can (`_project`), with the same bits as the separate steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.engine.linear import Linear
from server.engine.lora_apply import LayerAdapters, add_adapters, one_kernel_call, project
from server.engine.rms_norm import rms_norm

if TYPE_CHECKING:
    from server.engine.models.base import LayerWeights


class LayerArithmetic:
    """The per-layer arithmetic of a `DecoderModel` (mixed into it: the attributes used here,
    e.g. `eps`, `norm_kernel`, `rope_tables`, are set by its __init__)."""

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm: x / sqrt(mean(x²) + eps) * weight, float32 inside, one rounding at the
        end (LlamaRMSNorm rounds before the weight: outputs differ from it by at most one
        unit in the last place; a float32 weight on bf16 rows, as Gemma's norms take it, is
        Gemma's arithmetic). On a CPU, ragtune's kernel in one call (engine/rms_norm.py: at
        16 rows ~25x faster than the route below); else LayerNorm over [x, -x], whose row
        has mean 0 and variance mean(x²), in LayerNorm's fused kernel (torch's rms_norm is
        six ops). `weight`: doubled, [weight, weight] (see `doubled`)."""
        features = x.shape[-1]
        if self.norm_kernel and features % 8 == 0:
            return rms_norm(x, self._kernel_norm_weight(weight), self.eps)
        paired = torch.cat((x, x.neg()), dim=-1)
        return F.layer_norm(paired, (2 * features,), weight, None, self.eps)[..., :features]

    def _kernel_norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 [features] weight the norm kernel takes, made once per doubled one."""
        held = self._kernel_norm_weights.get(id(weight))
        if held is None:  # the doubled weight is kept with it: its id stays its own
            half = weight[: weight.shape[0] // 2].float().contiguous()
            held = self._kernel_norm_weights[id(weight)] = (weight, half)
        return held[1]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): the same
        products bit for bit (the sign moved onto sin), in one roll instead of three ops.
        With a partial rotary factor (Phi-3.5/4) only the first rotary_dim features turn."""
        if self.rotary_dim < self.head_dim:
            turned, kept = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
            return torch.cat((self._rotate_all(turned, cos, signed_sin), kept), dim=-1)
        return self._rotate_all(x, cos, signed_sin)

    @staticmethod
    def _rotate_all(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def _rotary(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each rotary kind's cos and sin at these positions, [tokens, 1, rotary_dim]."""
        return {
            kind: (cos[positions][:, None, :], sin[positions][:, None, :])
            for kind, (cos, sin) in self.rope_tables.items()
        }

    def _attention_input(
        self,
        w: LayerWeights,
        x: torch.Tensor,  # [tokens, hidden]
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],  # see _rotary
        lora: LayerAdapters | None,
        wide: bool = False,  # a prompt chunk of more than WIDE_ROWS tokens
        rotate: bool = True,  # False: the decode attention kernel turns q and k itself
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, fused q/k/v projection and rotary embedding: q [tokens, heads, d], k and v
        [tokens, kv_heads, d]."""
        if w.qkv_bias is None:
            qkv = self._project(lora, "qkv", w.qkv, x, wide, norm=w.input_norm)
        else:  # the bias before the adapters, as PEFT adds them
            h = self._rms_norm(x, w.input_norm)
            qkv = add_adapters(lora, "qkv", h, w.qkv(h, wide) + w.qkv_bias)
        tokens = x.shape[0]
        cos, sin = rotary[w.rope]
        # q and k heads side by side, rotated in one go
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, -1, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        if w.q_norm is not None:  # per-head norms before the rotation
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self._rms_norm(q, w.q_norm), self._rms_norm(k, w.k_norm)), dim=1)
        if rotate:
            qk = self._rotate(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v

    def _attention_output(
        self,
        w: LayerWeights,
        x: torch.Tensor,  # [tokens, hidden] the layer's input (residual)
        attn: torch.Tensor,  # [tokens, q_size]
        lora: LayerAdapters | None,
        wide: bool = False,
    ) -> torch.Tensor:
        """Output projection, residual and MLP: the layer's output [tokens, hidden]."""
        x = self._project(lora, "o", w.o, attn, wide, out_norm=w.attn_out_norm, residual=x)
        gate, up = self._project(lora, "gate_up", w.gate_up, x, wide, norm=w.mlp_norm).chunk(
            2, dim=-1
        )
        act = self.activation(gate) * up
        return self._project(lora, "down", w.down, act, wide, out_norm=w.mlp_out_norm, residual=x)

    def _project(
        self,
        lora: LayerAdapters | None,
        group: str,
        linear: Linear,
        x: torch.Tensor,  # [tokens, features]
        wide: bool = False,
        norm: torch.Tensor | None = None,  # an RMSNorm before: its doubled weight
        residual: torch.Tensor | None = None,  # [tokens, out] added after
        out_norm: torch.Tensor | None = None,  # an RMSNorm of the product, before `residual`
    ) -> torch.Tensor:
        """project(...) of RMSNorm(x) where `norm`, normalized where `out_norm`, plus
        `residual` where given: in the a8 kernel's one call where the projection is one
        (lora.one_kernel_call) and the norms are the norm kernel's (a decode step: four
        calls a layer fewer, eight for Gemma 3, each ~5-10 µs of fixed cost at 1-16 rows),
        else step by step. The same bits either way: the kernel runs the norm kernel's
        arithmetic and rounds the sum as torch's add does."""
        alone, rows = one_kernel_call(lora, group, linear, wide)
        # the norm kernel's arithmetic is the unfused route's only where _rms_norm takes it
        # (an a8 linear's features are multiples of 32: its % 8 condition holds)
        norms_fuse = self.norm_kernel or (norm is None and out_norm is None)
        residual_fuses = residual is None or (
            residual.is_contiguous() and residual.dtype == x.dtype
        )
        if alone and norms_fuse and residual_fuses and x.dim() == 2:
            return linear(
                x,
                lora=rows,
                norm=self._fused_norm(norm),
                out_norm=self._fused_norm(out_norm),
                residual=residual,
            )
        if norm is not None:
            x = self._rms_norm(x, norm)
        out = project(lora, group, linear, x, wide)
        if out_norm is not None:
            out = self._rms_norm(out, out_norm)
        return out if residual is None else residual + out

    def _fused_norm(self, weight: torch.Tensor | None) -> tuple[torch.Tensor, float] | None:
        """A doubled norm weight as the a8 kernel's fused norm takes it."""
        return None if weight is None else (self._kernel_norm_weight(weight), self.eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self._rms_norm(x, self.norm))
        if self.logit_softcap:  # in the head's dtype, as Gemma2ForCausalLM caps them
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()
