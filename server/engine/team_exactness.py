"""How far the engine's thread team may shrink without changing a result: checked at start-up
on this device, with the model's own forward, at the team sizes below the full one (going
down, starting none after `PROBE_BUDGET_S` seconds of start-up).

Why: the team sizer (team_size.py) changes the engine's thread count while it serves.
ragtune's kernels (csrc/) split their work so that no sum depends on the thread count, but
the library routes beside them (oneDNN's and MKL's GEMMs for prompt chunks and LoRA, torch's
attention where no kernel of ours runs) may pick their blocking by it. Where one does, a
prefix cached by one team would differ in its bits from its recomputation by another, and a
seeded request's answer would depend on the moment it ran. So the team shrinks only as far
as the probe below gives the full team's bits: a size that fails costs speed beside busy work
(the team stays larger), never a result that depends on the thread count.

The probe: two prompts (one on the wide prompt path, its prompt logprobs asked for as an echo
asks, one short) prefilled and decoded together through the runner, greedy, their logits and
logprobs compared bit for bit; then LoRA's library GEMMs at the model's factor shapes (LoRA
factors are not in the probe's forward). The serial fallback runner (Hugging Face's modules,
one sequence at a time) is outside ragtune's exactness checks altogether: there every size is
allowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from server.engine.models.exactness import lora_factor_shapes
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

# a prompt longer than exactness.WIDE_ROWS (the wide prompt path, several chunks where
# engine.prefill_chunk is short) and a short one, prefilled and decoded together
PROBE_PROMPT_LENGTHS = (97, 5)
PROBE_DECODE_STEPS = 3
# rows of the LoRA probe's GEMMs: a decode batch and a prompt chunk
PROBE_LORA_ROWS = (16, 100)
# seconds of start-up the probe may take before it stops going down (on 2 cores it takes
# 0.4-2.2 s in all: docs/performance.md, stop 40)
PROBE_BUDGET_S = 5.0


def probe_sequences(runner: CompactRunner, tokenizer) -> list[Sequence]:
    vocab = runner.model.vocab_size
    longest = max(2, runner.max_seq_len - PROBE_DECODE_STEPS - 2)  # room for the decode steps
    seqs = []
    for n, length in enumerate(PROBE_PROMPT_LENGTHS):
        prompt = [(31 * i + 7 * n + 11) % vocab for i in range(min(length, longest))]
        scored = 1 if n == 0 else None  # echo + logprobs: the head over many prompt rows
        params = SamplingParams(PROBE_DECODE_STEPS + 1, temperature=0, prompt_logprobs=scored)
        request = GenerationRequest(f"team-probe-{n}", prompt, params)
        seqs.append(Sequence(request, tokenizer, set(), lambda output: None))
    return seqs


def greedy_rows(runner: CompactRunner, seqs: list[Sequence]) -> list[torch.Tensor]:
    """`seqs` prefilled and decoded together, greedy: every logits row they give."""
    rows: list[torch.Tensor] = []
    try:
        for seq in seqs:
            runner.add(seq)
        pending = list(seqs)
        while pending:
            for seq, logits in zip(pending, runner.prefill(pending), strict=True):
                if logits is not None:
                    rows.append(logits.clone())
                    seq.output_ids.append(int(logits.argmax()))
            pending = [seq for seq in pending if seq.cache_len < seq.prompt_len]
        for _ in range(PROBE_DECODE_STEPS):
            logits = runner.decode(seqs)
            rows.append(logits.clone())
            for seq, row in zip(seqs, logits, strict=True):
                seq.output_ids.append(int(row.argmax()))
    except BaseException:
        for seq in seqs:
            seq.finish_reason = "error"  # its slot is cleared on release
        raise
    finally:
        for seq in reversed(seqs):
            runner.release(seq)
    return rows


def runner_logits(runner: CompactRunner, tokenizer) -> list[torch.Tensor]:
    """Every logits row the probe's prompts give (together where the runner has the slots,
    else one after the other), then the long prompt's logprobs. The prefix cache is set
    aside: the probe must compute every row, and leaves nothing behind in it."""
    seqs = probe_sequences(runner, tokenizer)
    groups = [seqs] if runner.cache.num_slots >= len(seqs) else [[seq] for seq in seqs]
    rows: list[torch.Tensor] = []
    saved, runner.prefix_cache = runner.prefix_cache, None
    try:
        for group in groups:
            rows += greedy_rows(runner, group)
    finally:
        runner.prefix_cache = saved
    for seq in seqs:
        scores = [entry for entry in seq.prompt_scores or [] if entry is not None]
        logprobs = [[entry.logprob, *(lp for _, lp in entry.top)] for entry in scores]
        if logprobs:
            rows.append(torch.tensor(logprobs, dtype=torch.float64))
    return rows


def lora_products(runner: CompactRunner) -> list[torch.Tensor]:
    """LoRA's library GEMMs (lora_apply.add_lora: rows @ A, then @ B) at the model's factor
    shapes, on fixed inputs."""
    model = runner.model
    generator = torch.Generator().manual_seed(3)
    products = []
    for in_features, out_features in lora_factor_shapes(model):
        factor = torch.randn(in_features, out_features, generator=generator)
        factor = factor.to(model.dtype).to(model.device)
        for rows in PROBE_LORA_ROWS:
            x = torch.randn(rows, in_features, generator=generator).to(model.dtype)
            products.append(x.to(model.device) @ factor)
    return products


def probe_outputs(runner: CompactRunner, tokenizer) -> list[torch.Tensor]:
    return runner_logits(runner, tokenizer) + lora_products(runner)


def fewest_exact_threads(
    runner,
    tokenizer,
    most: int,
    resize: Callable[[int], None] = torch.set_num_threads,
    budget_s: float = PROBE_BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str | None]:
    """(the smallest team size from which every size up to `most` gives the full team's bits,
    why it is not 1). Runs on the calling thread's team, which it leaves at `most`. Sizes are
    probed downwards, one forward each, starting none once `budget_s` is spent (the next
    size below the full team always): start-up stays bounded on a machine of many cores,
    and a team beside busy work rarely needs to lose more than the few threads it holds."""
    if not isinstance(runner, CompactRunner):
        return 1, None
    if runner.slots:  # the engine has not started yet: nothing may be resident
        raise RuntimeError("the team probe needs an idle runner")
    started = clock()
    resize(most)
    full = probe_outputs(runner, tokenizer)
    fewest, reason = most, None
    try:
        for threads in range(most - 1, 0, -1):
            if threads < most - 1 and clock() - started > budget_s:
                reason = (
                    f"sizes below {fewest} threads are unchecked: the start-up probe stops "
                    f"after {budget_s:g} s"
                )
                break
            resize(threads)
            outputs = probe_outputs(runner, tokenizer)
            same = len(outputs) == len(full) and all(
                torch.equal(a, b) for a, b in zip(outputs, full, strict=True)
            )
            if not same:
                reason = f"{threads} threads give other bits than {most} on this device"
                break
            fewest = threads
    finally:
        resize(most)
    return fewest, reason


__all__ = ["fewest_exact_threads", "probe_outputs"]
