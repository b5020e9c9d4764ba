"""Send every question through the server once per arm, with fixed decoding settings.

An arm is a `model` (the base model id or the adapter name) plus whether the request carries
`rag`. All arms share the system prompt, temperature 0, seed and max_tokens, so the only
difference between them is the adapter and the retrieved context. Requests go through the
official `openai` client, a few at a time (the server batches concurrent requests);
latency is measured per request under that concurrency.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

from evaluation.dataset import QAItem
from training.recipes.claims import LABEL_INSTRUCTION

# A row's scores from its own generation request (not kept in results.json): the first
# answer token's top alternatives {text: logprob} and, with `score_from_generation`, the last
# prompt tokens' vLLM `prompt_logprobs` entries. Likelihood scoring (likelihood.py) reads the
# answer choices' log-likelihoods from them where it can, instead of scoring the prompt a
# second time; where it echoes, the alternatives say which choice to echo (the least likely,
# so the others are read from its top alternatives instead of prefilled again).
GENERATION_SCORES_KEY = "generation_scores"
FIRST_TOKEN_ALTERNATIVES = 20  # OpenAI's most
PROMPT_TAIL = 8  # prompt tokens kept: the continuation's shared prefix is one or two

logger = logging.getLogger(__name__)

ARM_NAMES = ("base", "rag", "ft", "ft+rag")

# the instruction the `claims` recipe trains knowledge adapters under, so they keep its format
LABEL_PROMPT = LABEL_INSTRUCTION
FREE_PROMPT = "Answer the question in one or two sentences."
FREE_PROMPT_JA = "質問に一、二文で答えてください。"


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    rag: bool


@dataclass(frozen=True)
class GenerationSettings:
    """What every request of a run shares; recorded in results.json."""

    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    system_prompt: str | None = None
    index: str | None = None
    top_k: int = 3
    mode: str | None = None
    concurrency: int = 8
    # ask each request for the scores likelihood scoring can reuse (GENERATION_SCORES_KEY)
    score_from_generation: bool = False
    # ask only for the first answer token's alternatives: the echo order's hint
    first_token_alternatives: bool = False

    def keeps_scores(self) -> bool:
        return self.score_from_generation or self.first_token_alternatives

    def rag_body(self) -> dict[str, Any]:
        options: dict[str, Any] = {"top_k": self.top_k}
        if self.index:
            options["index"] = self.index
        if self.mode:
            options["mode"] = self.mode
        return {"rag": options}


def parse_arms(spec: str, base_model: str, adapter: str | None) -> list[Arm]:
    """`base,rag,ft,ft+rag` -> arms; the ft arms need an adapter."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARM_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown arm(s) {unknown or spec!r}; choose from {','.join(ARM_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--arms lists an arm twice: {spec!r}")
    if any(name.startswith("ft") for name in names) and not adapter:
        raise ValueError("the ft and ft+rag arms need --adapter NAME")
    return [
        Arm(name, adapter if name.startswith("ft") else base_model, name.endswith("rag"))
        for name in names
    ]


def default_system_prompt(items: list[QAItem]) -> str:
    """A yes/no/maybe instruction when most questions carry a label, else a short-answer
    one (in Japanese when most questions are Japanese)."""
    from training.chunks import is_japanese

    labelled = sum(item.label is not None for item in items)
    if labelled * 2 > len(items):
        return LABEL_PROMPT
    japanese = sum(is_japanese(item.question) for item in items)
    return FREE_PROMPT_JA if japanese * 2 > len(items) else FREE_PROMPT


def _messages(item: QAItem, settings: GenerationSettings) -> list[dict[str, str]]:
    # The instruction is a system turn so the user turn (what the server retrieves with and
    # puts into its RAG template) is the bare question.
    messages = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    messages.append({"role": "user", "content": item.question})
    return messages


def ask(client: Any, arm: Arm, item: QAItem, settings: GenerationSettings) -> dict[str, Any]:
    """One request; failures become a row with `error` set (scored as an empty answer)."""
    import openai

    started = time.perf_counter()
    row: dict[str, Any] = {"id": item.id, "arm": arm.name, "model": arm.model, "rag": arm.rag}
    try:
        response = client.chat.completions.create(
            model=arm.model,
            messages=_messages(item, settings),
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
            extra_body=_extra_body(arm, settings),
            **_logprob_options(settings),
        )
    except openai.APIError as exc:
        row.update(answer="", error=f"{type(exc).__name__}: {exc}", latency_s=None)
        row.update(finish_reason=None, prompt_tokens=None, completion_tokens=None, sources=[])
        return row
    latency = time.perf_counter() - started
    choice = response.choices[0]
    usage = response.usage
    sources = (response.model_extra or {}).get("sources") or []
    row.update(
        answer=choice.message.content or "",
        error=None,
        latency_s=latency,
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        sources=[
            {k: source.get(k) for k in ("source", "chunk_id", "score", "text", "title")}
            for source in sources
        ],
    )
    if settings.keeps_scores():
        row[GENERATION_SCORES_KEY] = _generation_scores(choice, response.model_extra or {})
    return row


def _extra_body(arm: Arm, settings: GenerationSettings) -> dict[str, Any] | None:
    body = settings.rag_body() if arm.rag else {}
    if settings.score_from_generation:
        body["prompt_logprobs"] = 0  # vLLM's extension: each prompt token's own logprob
    return body or None


def _logprob_options(settings: GenerationSettings) -> dict[str, Any]:
    if not settings.keeps_scores():
        return {}
    return {"logprobs": True, "top_logprobs": FIRST_TOKEN_ALTERNATIVES}


def _generation_scores(choice: Any, extra: dict[str, Any]) -> dict[str, Any] | None:
    content = choice.logprobs.content if choice.logprobs else None
    if not content:
        return None
    prompt = extra.get("prompt_logprobs")
    return {
        "first_top": {alt.token: alt.logprob for alt in content[0].top_logprobs},
        "prompt_tail": prompt[-PROMPT_TAIL:] if prompt else None,
    }


def run_arm(
    client: Any,
    arm: Arm,
    items: list[QAItem],
    settings: GenerationSettings,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows in dataset order. One untimed warm-up request first, so loading the adapter or
    the index is not charged to the first question's latency."""
    from tqdm import tqdm

    warm = ask(client, arm, items[0], replace(settings, max_tokens=1))
    if warm["error"] and settings.keeps_scores():
        plain = replace(settings, score_from_generation=False, first_token_alternatives=False)
        if not ask(client, arm, items[0], replace(plain, max_tokens=1))["error"]:
            logger.warning(
                "arm %s: the server refuses prompt_logprobs/top_logprobs (%s); likelihood "
                "scoring will score every prompt with a request of its own",
                arm.name,
                warm["error"],
            )
            settings, warm = plain, {"error": None}
    if warm["error"]:
        raise RuntimeError(f"arm {arm.name} ({arm.model}) fails: {warm['error']}")
    rows: list[dict[str, Any] | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=f"{arm.name:>7}", unit="q", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool:
        futures = {pool.submit(ask, client, arm, item, settings): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            bar.update(1)
    bar.close()
    failed = sum(bool(row and row["error"]) for row in rows)
    if failed:
        logger.warning("arm %s: %d of %d requests failed", arm.name, failed, len(items))
    return [row for row in rows if row is not None]


def run_all(
    client: Any,
    arms: list[Arm],
    items: list[QAItem],
    settings: GenerationSettings,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Arm by arm (never interleaved), so each arm's latencies see only its own load."""
    results = {}
    for arm in arms:
        started = time.perf_counter()
        results[arm.name] = run_arm(client, arm, items, settings, progress)
        elapsed = time.perf_counter() - started
        logger.info("arm %s: %d questions in %.1fs", arm.name, len(items), elapsed)
    return results
