"""Score a fixed answer set by log-likelihood, as lm-evaluation-harness scores
`multiple_choice` tasks, through the server's own logprobs.

For each (context, choice) pair, as lm-eval's `_encode_pair` for causal models: trailing
whitespace of the context moves to the front of the continuation; the context and
context + continuation are tokenized (the server's `/tokenize`); the continuation's ids are
the whole's ids past the context's. The pair is sent as a token-id prompt to
`/v1/completions` with `echo`, `logprobs` and `max_tokens: 0`, and the continuation tokens'
logprobs are summed; `greedy` says whether every one of them was the top token. The
prediction is the choice with the highest sum (`acc`), the highest sum per character of the
choice (`acc_norm`, lm-eval's) or per UTF-8 byte (`acc_bytes`).

One prefill serves every choice that differs from the echoed one only in its last token
(yes / no / maybe after the same context): that token's logprob is read from the
`top_logprobs` of the echoed choice's last position, the same row of the same forward
pass. A choice not among those top entries is scored by a request of its own, so the
numbers are always the ones a request per choice would give. Which choice is echoed
matters: the others must be among its last position's top entries, so the bench echoes the
one its generation request's first-token alternatives rank lowest (`least_likely`), and
"maybe" ranked 30th costs no second prefill.

The bench's own generation request can make even that prefill unneeded
(`score_from_generation`): it sent the same prompt, and asked for its prompt tokens'
logprobs (vLLM's `prompt_logprobs`) and the first answer token's top alternatives. The
context plus the continuation's shared prefix (the chat template's trailing newline, which
`_encode_pair` moves) is that prompt, so the prefix's logprobs are its last prompt tokens'
and each choice's last token is one of the first answer token's alternatives: the same rows
of the same model, computed by the generation's prefill instead of a second one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evaluation.server_api import EchoChoice, ScoringClient

TOP_LOGPROBS = 20  # alternatives per position (the most the API gives): a label set's other choices


@dataclass(frozen=True)
class ChoiceScore:
    loglikelihood: float
    greedy: bool
    tokens: int
    # the log-likelihood is at most `loglikelihood` (its last token was not among the
    # alternatives a generation request kept): it counts only where it cannot win
    upper_bound: bool = False


def encode_pair(
    tokenize: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` (causal): (context ids, continuation ids)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenize(context + continuation)
    context_ids = tokenize(context)
    return context_ids, whole[len(context_ids) :]


def _continuation(choice: EchoChoice, start: int, length: int) -> ChoiceScore:
    logprobs = choice.token_logprobs[start : start + length]
    tops = choice.top_logprobs[start : start + length]
    if any(lp is None for lp in logprobs):
        raise ValueError("a continuation token has no logprob (empty context?)")
    greedy = all(
        top is not None and lp >= max(top.values()) for lp, top in zip(logprobs, tops, strict=True)
    )
    return ChoiceScore(float(sum(logprobs)), greedy, length)  # type: ignore[arg-type]


Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def choice_pairs(
    client: ScoringClient, tokenize_model: str, context: str, choices: tuple[str, ...]
) -> list[Pair]:
    """encode_pair of each choice after `context`, tokenized by the server."""
    known: dict[str, list[int]] = {}

    def tokenize(text: str) -> list[int]:
        if text not in known:
            known[text] = client.tokenize(tokenize_model, text)
        return known[text]

    pairs = [encode_pair(tokenize, context, choice) for choice in choices]
    if any(not cont for _, cont in pairs):
        raise ValueError("a choice adds no token to the context")
    return pairs


def scores_from_generation(
    pairs: list[Pair],
    prompt_ids: list[int],
    generation: dict[str, Any] | None,
    last_texts: list[str],
) -> list[ChoiceScore] | None:
    """The choices' scores read from the generation request's own logprobs (see above), or
    None where they are not all there: a choice differing from the others before its last
    token, a context that is not the prompt minus the shared prefix, a prompt whose last
    tokens are not the ones sent, or a last token outside the alternatives kept."""
    if not generation or not generation.get("prompt_tail"):
        return None
    tail, top = generation["prompt_tail"], generation["first_top"]
    context, shared = pairs[0][0], pairs[0][1][:-1]
    if any(ctx != context or cont[:-1] != shared for ctx, cont in pairs):
        return None
    if context + shared != prompt_ids or len(shared) >= len(tail) or len(tail) > len(prompt_ids):
        return None
    entries = []
    for token, entry in zip(prompt_ids[-len(tail) :], tail, strict=True):
        if entry is not None and str(token) not in entry:
            return None  # the generation's prompt ended in other tokens
        entries.append(None if entry is None else entry[str(token)])
    prefix = entries[len(entries) - len(shared) :] if shared else []
    if any(entry is None for entry in prefix) or len(set(last_texts)) < len(last_texts):
        return None
    if not any(text in top for text in last_texts):
        return None
    total = float(sum(entry["logprob"] for entry in prefix))
    prefix_greedy = all(entry.get("rank") == 1 for entry in prefix)
    best, least = max(top.values()), min(top.values())
    return [
        ChoiceScore(total + top[text], prefix_greedy and top[text] >= best, len(cont))
        if text in top
        else ChoiceScore(total + least, False, len(cont), upper_bound=True)
        for text, (_, cont) in zip(last_texts, pairs, strict=True)
    ]


def settle_bounds(
    client: ScoringClient, model: str, pairs: list[Pair], scores: list[ChoiceScore]
) -> list[ChoiceScore]:
    """Exact scores for the bounded choices (one echo request for all of them), the others
    kept: what a generation request's scores need where a bounded choice could win."""
    bounded = [j for j, score in enumerate(scores) if score.upper_bound]
    if not bounded:
        return scores
    echoed = client.echo(model, [pairs[j][0] + pairs[j][1] for j in bounded], TOP_LOGPROBS)
    settled = list(scores)
    for j, choice in zip(bounded, echoed, strict=True):
        settled[j] = _continuation(choice, len(pairs[j][0]), len(pairs[j][1]))
    return settled


def least_likely(last_texts: list[str], first_top: dict[str, float] | None) -> int:
    """The choice to echo: the one whose last token the generation request's first-token
    alternatives rank lowest (absent: lowest of all). The others, being more likely, are then
    among the echoed position's top alternatives and need no prefill of their own."""
    if not first_top:
        return 0
    floor = float("-inf")
    return min(range(len(last_texts)), key=lambda j: (first_top.get(last_texts[j], floor), j))


def score_choices(
    client: ScoringClient,
    model: str,
    context: str,
    choices: tuple[str, ...],
    tokenize_model: str | None = None,
    pairs: list[Pair] | None = None,
    first: int = 0,
) -> list[ChoiceScore]:
    """Log-likelihood of each choice after `context` (a rendered prompt), under `model`.
    Choice `first` is echoed; the choices that differ from it only in their last token are
    read from that position's top alternatives where they are among them."""
    tokenize_as = tokenize_model or model
    pairs = pairs or choice_pairs(client, tokenize_as, context, choices)
    first_ctx, first_cont = pairs[first]
    echoed_first = client.echo(model, [first_ctx + first_cont], TOP_LOGPROBS)[0]
    scores: list[ChoiceScore | None] = [None] * len(pairs)
    scores[first] = _continuation(echoed_first, len(first_ctx), len(first_cont))
    last = len(first_ctx) + len(first_cont) - 1
    top = echoed_first.top_logprobs[last] or {}
    prefix = echoed_first.token_logprobs[len(first_ctx) : last]
    prefix_greedy = _continuation(echoed_first, len(first_ctx), len(first_cont) - 1).greedy
    shared = [
        j
        for j, (ctx, cont) in enumerate(pairs)
        if j != first
        and ctx == first_ctx
        and len(cont) == len(first_cont)
        and cont[:-1] == first_cont[:-1]
    ]
    texts = client.token_texts(tokenize_as, [pairs[j][1][-1] for j in shared]) if shared else []
    own_text = echoed_first.tokens[last] if last < len(echoed_first.tokens) else None
    for j, text in zip(shared, texts, strict=True):
        if text == own_text or text not in top:
            continue
        value = top[text]
        total = float(sum(prefix)) + value  # type: ignore[arg-type]
        greedy = prefix_greedy and value >= max(top.values())
        scores[j] = ChoiceScore(total, greedy, len(first_cont))
    missing = [j for j, score in enumerate(scores) if score is None]
    if missing:
        echoed = client.echo(model, [pairs[j][0] + pairs[j][1] for j in missing], TOP_LOGPROBS)
        for j, choice in zip(missing, echoed, strict=True):
            scores[j] = _continuation(choice, len(pairs[j][0]), len(pairs[j][1]))
    return [score for score in scores if score is not None]


def _argmax(values: list[float]) -> int:
    """First index of the maximum (numpy's argmax tie rule, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _normalized(scores: list[ChoiceScore], choices: tuple[str, ...]) -> list[list[float]]:
    """The values acc, acc_norm (per character) and acc_bytes (per UTF-8 byte) compare."""
    lls = [score.loglikelihood for score in scores]
    per_char = [ll / max(len(choice), 1) for ll, choice in zip(lls, choices, strict=True)]
    per_byte = [
        ll / max(len(choice.encode("utf-8")), 1) for ll, choice in zip(lls, choices, strict=True)
    ]
    return [lls, per_char, per_byte]


def decided(scores: list[ChoiceScore], choices: tuple[str, ...]) -> bool:
    """Whether every metric's pick is certain though some scores are only upper bounds: the
    pick is an exact score above every bound (a bounded choice scores at most its bound,
    so it can neither win nor tie)."""
    bounded = [i for i, score in enumerate(scores) if score.upper_bound]
    for values in _normalized(scores, choices):
        pick = _argmax(values)
        if pick in bounded or any(values[i] >= values[pick] for i in bounded):
            return False
    return True


def choice_metrics(
    scores: list[ChoiceScore], choices: tuple[str, ...], gold: int | None
) -> dict[str, Any]:
    """lm-eval's multiple_choice metrics for one question: acc, acc_norm (per character),
    acc_bytes (per UTF-8 byte), and the choice each picks. Scores that are upper bounds
    must leave every pick `decided`; they are reported as bounds, not values."""
    if not decided(scores, choices):
        raise ValueError("an upper-bounded choice could win: score it exactly")
    lls, per_char, per_byte = _normalized(scores, choices)
    pick, pick_norm, pick_bytes = _argmax(lls), _argmax(per_char), _argmax(per_byte)
    return {
        "choices": list(choices),
        "loglikelihoods": [
            None if score.upper_bound else round(ll, 6)
            for ll, score in zip(lls, scores, strict=True)
        ],
        "loglikelihood_bounds": [
            round(ll, 6) if score.upper_bound else None
            for ll, score in zip(lls, scores, strict=True)
        ],
        "greedy": [score.greedy for score in scores],
        "likelihood_choice": choices[pick],
        "likelihood_choice_norm": choices[pick_norm],
        "likelihood_accuracy": None if gold is None else float(pick == gold),
        "likelihood_acc_norm": None if gold is None else float(pick_norm == gold),
        "likelihood_acc_bytes": None if gold is None else float(pick_bytes == gold),
    }
