"""ragtune's C++ kernels alone, against torch's route for the same work. Prints one JSON line
per case (µs a call).

    python bench/native_kernels.py attention          # decode attention, 16 rows, hot and cold
    python bench/native_kernels.py prompt             # prompt attention, torch's or the kernel
    python bench/native_kernels.py prompt --dtype fp32   # ... its float body (the AVX2 kind's)
    python bench/native_kernels.py a8                 # the a8 GEMM per instruction set
    python bench/native_kernels.py norm               # RMSNorm
    python bench/native_kernels.py head               # the int8 vocabulary projection
    python bench/native_kernels.py rope               # rotary + attention, torch's or the kernel's
    python bench/native_kernels.py greedy             # the sampler's argmax + finiteness pass

Run on a quiet machine (nothing else CPU-heavy): these are the figures of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from server.engine import attention_prompt, attention_rows, native
from server.engine.a8 import A8Linear
from server.engine.attention_rows import RowsPlan
from server.engine.channel_int8 import ChannelInt8Linear
from server.engine.kv_cache import KVCache
from server.engine.linear import W8A8Linear
from server.engine.models.attention import attention, prompt_attention
from server.engine.models.layer import LayerArithmetic
from server.engine.rms_norm import rms_norm

# (heads, kv_heads, head_dim): Gemma 3 270M, SmolLM2-135M
ATTENTION_SHAPES = [(4, 1, 256), (9, 3, 64)]
# (vocabulary, hidden): SmolLM2-135M's and Gemma 3 270M's heads
HEAD_SHAPES = [(49152, 576), (262144, 640)]
# (out, in): SmolLM2's gate/up, down, qkv; Gemma 3's gate/up
GEMM_SHAPES = [(3072, 576), (576, 1536), (960, 576), (8192, 640)]


def per_call(fn, calls: int) -> float:
    for _ in range(max(3, calls // 20)):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - started) / calls * 1e6, 1)


def attention_case(heads: int, kv: int, d: int, keys: int, layers: int, rows: int = 16) -> dict:
    """µs a layer: torch's three ops (hot), the kernel hot (one layer again and again) and
    cold (`layers` layers in turn after 64 MB of other traffic, as in a real step)."""
    model = SimpleNamespace(head_dim=d, num_heads=heads, num_kv_heads=kv, q_size=heads * d,
                            scale=d**-0.5, attn_softcap=None)  # fmt: skip
    cache = KVCache(layers, rows, kv, 4096, d, torch.bfloat16, "cpu")
    cache.reserve(keys, 0)
    cache.ensure_slots(rows, 0)
    for layer in range(layers):
        cache.keys_t[layer].normal_()
        cache.values[layer].normal_()
    q = torch.randn(rows, heads, d).bfloat16()
    k, v = torch.randn(rows, kv, d).bfloat16(), torch.randn(rows, kv, d).bfloat16()
    positions = torch.arange(rows) + keys - rows
    hidden = torch.arange(keys)[None] > positions[:, None]
    bias = torch.zeros(rows, keys).masked_fill(hidden, float("-inf"))
    plan = RowsPlan(keys, bias, positions.clone())
    keys_t, values = cache.keys_t[0][:rows, :, :, :keys], cache.values[0][:rows, :, :keys]
    torch_bias = bias[:, None, :].repeat_interleave(kv, 0).expand(-1, heads // kv, -1)
    torch_bias = torch_bias.contiguous().bfloat16()
    grouped = q.reshape(rows * kv, heads // kv, d)
    result = {"case": "attention", "heads": heads, "kv_heads": kv, "head_dim": d, "keys": keys}
    result["torch_hot_us"] = per_call(
        lambda: attention(grouped, keys_t.reshape(rows * kv, d, keys),
                          values.reshape(rows * kv, keys, d), torch_bias, model.scale),
        100,
    )  # fmt: skip
    result["kernel_hot_us"] = per_call(
        lambda: attention_rows.attend(model, 0, q, k, v, cache, plan), 100
    )
    flush = torch.empty(64 * 2**20, dtype=torch.uint8)
    total = 0.0
    for _ in range(8):
        flush.add_(1)
        started = time.perf_counter()
        for layer in range(layers):
            attention_rows.attend(model, layer, q, k, v, cache, plan)
        total += time.perf_counter() - started
    result["kernel_cold_us"] = round(total / 8 / layers * 1e6, 1)
    result["path"] = "bf16 pairs" if native.attention_pairs() else "float lanes"
    return result


# (rows, keys, window): a 1,024-token prompt whole, its second 512-token chunk, one 128-row
# chunk late in a long prompt, a short chunk; then Gemma 3's local layers (window 512)
PROMPT_CASES = [(1024, 1024, None), (512, 1536, None), (128, 1024, None), (32, 512, None),
                (1024, 1024, 512), (512, 1536, 512)]  # fmt: skip


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def prompt_case(
    heads: int, kv: int, d: int, rows: int, keys: int, window: int | None, dtype: torch.dtype
) -> dict:
    """ms a layer for one prompt chunk's attention (its rows the last of `keys` positions):
    torch's route (models/attention.py) as a server on this CPU runs it (bf16 on AMX: blocks
    of 128 queries, the last padded, over keys padded to a multiple of 32; float32: plain, the
    chunk's own keys) against the kernel (engine/attention_prompt.py, over the chunk's own
    keys; its body for this dtype and CPU)."""
    from ragtune.hardware import detect
    from server.engine.models.attention import PROMPT_QUERY_BLOCK
    from server.engine.models.exactness import PROMPT_KEY_MULTIPLE

    # where the served bf16 route pads (runner.py)
    amx = "amx_bf16" in detect().features and dtype is torch.bfloat16
    model = SimpleNamespace(head_dim=d, num_heads=heads, num_kv_heads=kv, q_size=heads * d,
                            scale=d**-0.5, prompt_query_block=PROMPT_QUERY_BLOCK if amx else None,
                            prompt_kernel=False, device="cpu", dtype=dtype,
                            attn_softcap=None)  # fmt: skip
    padded = -(-keys // PROMPT_KEY_MULTIPLE) * PROMPT_KEY_MULTIPLE if amx else keys
    q = torch.randn(rows, heads, d).to(dtype)
    keys_t, values = torch.randn(kv, d, padded).to(dtype), torch.randn(kv, padded, d).to(dtype)
    positions = torch.arange(keys - rows, keys)[:, None]
    hidden = torch.arange(padded)[None] > positions
    if window is not None:
        hidden |= torch.arange(padded)[None] <= positions - window
    mask = torch.zeros(rows, padded, dtype=dtype).masked_fill(hidden, float("-inf"))
    result = {"case": "prompt", "heads": heads, "kv_heads": kv, "head_dim": d, "rows": rows,
              "keys": keys, "window": window, "dtype": str(dtype).removeprefix("torch."),
              "body": "pairs" if attention_prompt.uses_pairs(model) else "float",
              "torch_route": "query blocks, padded keys" if amx else "plain"}  # fmt: skip
    for name, route, extent in (
        ("torch", prompt_attention, padded),
        ("kernel", attention_prompt.attend, keys),
    ):
        args = (model, q, keys_t[:, :, :extent], values[:, :extent], mask[:, :extent])
        result[f"{name}_ms"] = round(per_call(lambda r=route, a=args: r(*a), 20) / 1e3, 2)
    result["speedup"] = round(result["torch_ms"] / result["kernel_ms"], 2)
    return result


def a8_cases() -> list[dict]:
    torch.manual_seed(0)
    isas = {1: "avx2", 2: "avx512-vnni", 3: "amx-int8"}
    results = []
    for out_features, in_features in GEMM_SHAPES:
        weight = (torch.randn(out_features, in_features) * 0.02).bfloat16()
        for bits in (4, 8):
            for rows in (1, 9, 16):
                x = torch.randn(rows, in_features).bfloat16()
                case = {"case": "a8", "out": out_features, "in": in_features, "bits": bits,
                        "rows": rows}  # fmt: skip
                for isa in range(1, native.library().a8_isa() + 1):
                    linear = A8Linear(weight, bits, isa=isa)
                    case[f"{isas[isa]}_us"] = per_call(lambda: linear(x), 300)  # noqa: B023
                linear = A8Linear(weight, bits)
                case["torch_dense_bf16_us"] = per_call(lambda: F.linear(x, linear.dense), 300)  # noqa: B023
                results.append(case)
    return results


def head_cases(rounds: int = 3) -> list[dict]:
    """µs a call of the vocabulary projection, oneDNN's int8 GEMM (W8A8Linear) against
    ragtune's kernel for the same logits (ChannelInt8Linear), alternating `rounds` times (the
    weights stream from memory: its bandwidth varies on a shared machine)."""
    torch.manual_seed(0)
    results = []
    for vocabulary, hidden in HEAD_SHAPES:
        weight = (torch.randn(vocabulary, hidden) * 0.02).bfloat16()
        onednn = W8A8Linear(weight)
        kernel = ChannelInt8Linear(weight) if ChannelInt8Linear.supported() else None
        calls = max(10, 2_000_000 // vocabulary)
        for rows in (1, 16):
            x = torch.randn(rows, hidden).bfloat16()
            for _ in range(rounds):
                case = {"case": "head", "vocabulary": vocabulary, "hidden": hidden, "rows": rows,
                        "onednn_us": per_call(lambda: onednn(x), calls)}  # noqa: B023  # fmt: skip
                if kernel is not None:
                    case["kernel_us"] = per_call(lambda: kernel(x), calls)  # noqa: B023
                results.append(case)
    return results


def rope_cases(keys: int = 100, rounds: int = 2) -> list[dict]:
    """µs a layer of rotary embedding + decode attention, hot: q and k turned by torch's ops
    (LayerArithmetic._rotate) before the kernel, against the kernel turning them itself."""
    results = []
    for heads, kv, d in ATTENTION_SHAPES:
        for rows in (1, 16):
            m = SimpleNamespace(head_dim=d, num_heads=heads, num_kv_heads=kv, q_size=heads * d,
                                scale=d**-0.5, rotary_dim=d,
                                _rotate_all=LayerArithmetic._rotate_all)  # fmt: skip
            cache = KVCache(1, rows, kv, 4096, d, torch.bfloat16, "cpu")
            cache.reserve(keys, 0)
            cache.ensure_slots(rows, 0)
            qkv = torch.randn(rows, (heads + 2 * kv) * d).bfloat16()
            qk = qkv[:, : (heads + kv) * d].view(rows, -1, d)
            v = qkv[:, (heads + kv) * d :].view(rows, kv, d)
            cos, sin = torch.randn(rows, 1, d).bfloat16(), torch.randn(rows, 1, d).bfloat16()
            positions = torch.arange(rows) + keys - rows
            hidden = torch.arange(keys)[None] > positions[:, None]
            plan = RowsPlan(keys, torch.zeros(rows, keys).masked_fill(hidden, float("-inf")),
                            positions.clone())  # fmt: skip

            def torch_route():
                q, k = LayerArithmetic._rotate(m, qk, cos, sin).split([heads, kv], dim=1)  # noqa: B023
                return attention_rows.attend(m, 0, q, k, v, cache, plan)  # noqa: B023

            def kernel_route():
                q, k = qk.split([heads, kv], dim=1)  # noqa: B023
                return attention_rows.attend(m, 0, q, k, v, cache, plan, (cos, sin))  # noqa: B023

            for _ in range(rounds):
                results.append({
                    "case": "rope", "heads": heads, "kv_heads": kv, "head_dim": d, "rows": rows,
                    "keys": keys, "torch_rotate_us": per_call(torch_route, 2000),
                    "kernel_rotates_us": per_call(kernel_route, 2000),
                })  # fmt: skip
    return results


def greedy_cases() -> list[dict]:
    """µs a step's greedy pass over float32 logits: numpy's argmax + torch's row sums (the
    route before) against one pass of csrc/argmax_rows.cpp (sampler.greedy_and_finite)."""
    from server.engine.sampler import greedy_and_finite

    results = []
    for vocabulary, _ in HEAD_SHAPES:
        for rows in (1, 16):
            x = torch.randn(rows, vocabulary)

            def numpy_route():
                return x.numpy().argmax(-1).tolist(), torch.isfinite(x.sum(-1)).tolist()  # noqa: B023

            results.append({
                "case": "greedy", "rows": rows, "vocabulary": vocabulary,
                "numpy_sum_us": per_call(numpy_route, 200),
                "kernel_us": per_call(lambda: greedy_and_finite(x), 200),  # noqa: B023
            })  # fmt: skip
    return results


def norm_cases() -> list[dict]:
    results = []
    for rows, features in ((1, 576), (16, 576), (16, 640), (64, 576)):
        x = torch.randn(rows, features).bfloat16()
        weight = torch.rand(features)
        doubled = torch.cat((weight, weight)).bfloat16()

        def layer_norm_route():
            paired = torch.cat((x, x.neg()), dim=-1)  # noqa: B023
            return F.layer_norm(paired, (2 * features,), doubled, None, 1e-5)  # noqa: B023

        results.append({
            "case": "norm", "rows": rows, "features": features,
            "layer_norm_route_us": per_call(layer_norm_route, 2000),
            "kernel_us": per_call(lambda: rms_norm(x, weight, 1e-5), 2000),  # noqa: B023
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "which", choices=["attention", "prompt", "a8", "norm", "head", "rope", "greedy"]
    )
    parser.add_argument("--keys", default="200,1000")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="prompt's dtype")
    args = parser.parse_args()
    if args.which == "attention":
        cases = [
            attention_case(heads, kv, d, keys, layers=18)
            for keys in map(int, args.keys.split(","))
            for heads, kv, d in ATTENTION_SHAPES
        ]
    elif args.which == "prompt":
        cases = [
            prompt_case(heads, kv, d, rows, keys, window, DTYPES[args.dtype])
            for heads, kv, d in ATTENTION_SHAPES
            for rows, keys, window in PROMPT_CASES
            if window is None or d == 256  # the local layers are Gemma 3's
        ]
    elif args.which == "a8":
        cases = a8_cases()
    elif args.which == "head":
        cases = head_cases()
    elif args.which == "rope":
        cases = rope_cases()
    elif args.which == "greedy":
        cases = greedy_cases()
    else:
        cases = norm_cases()
    for case in cases:
        print(json.dumps(case), flush=True)


if __name__ == "__main__":
    main()
