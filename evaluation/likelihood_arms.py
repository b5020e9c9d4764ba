"""Likelihood scoring of every arm: for each question with an answer set, the arm's prompt
(the same conversation its generation request sent) and each choice's log-likelihood under
the arm's model, merged into the arm's rows. A free-text question (no answer set) gets its
first reference answer's log-likelihood per UTF-8 byte instead: how much more likely the
arm finds the right answer, however it would phrase its own.

Runs after generation, because a RAG arm is scored on the sources its own generation
request retrieved. Prompts are tokenized with the base model's name (adapters share its
tokenizer), so the base and ft arms share one tokenization. Where the generation request
kept its scores (runner.GENERATION_SCORES_KEY) they answer without another request to the
model (likelihood.scores_from_generation); each row says which (`likelihood_source`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.dataset import QAItem, answer_choices, gold_choice
from evaluation.likelihood import (
    choice_metrics,
    choice_pairs,
    decided,
    least_likely,
    score_choices,
    scores_from_generation,
    settle_bounds,
)
from evaluation.lm_eval_tasks import CONTEXT_KEY
from evaluation.prompts import chat_messages, load_headings, rag_user_turn
from evaluation.runner import GENERATION_SCORES_KEY, Arm
from evaluation.server_api import ScoringClient, ScoringError

logger = logging.getLogger(__name__)

LIKELIHOOD_METRICS = ("likelihood_accuracy", "likelihood_acc_norm", "likelihood_acc_bytes")
REFERENCE_METRIC = "reference_loglik_per_byte"


@dataclass
class LikelihoodSettings:
    base_model: str
    system_prompt: str | None
    labels: tuple[str, ...]
    index: str | None = None
    index_root: Path | None = None
    max_source_chars: int | None = None
    source_labels: bool = False  # retrieval.source_labels: the server's prompt, rebuilt
    concurrency: int = 8
    headings: dict[str, tuple[str, ...]] = field(default_factory=dict)


class _Contexts:
    """Rendered prompt text per conversation, shared by the arms (thread-safe)."""

    def __init__(self, client: ScoringClient, model: str):
        self.client, self.model = client, model
        self._known: dict[str, tuple[list[int], str]] = {}
        self._lock = threading.Lock()

    def get(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """(the prompt's token ids, its text)"""
        key = json.dumps(messages, ensure_ascii=False)
        with self._lock:
            found = self._known.get(key)
        if found is None:
            ids = self.client.tokenize_messages(self.model, messages)
            found = (ids, self.client.detokenize(self.model, ids))
            with self._lock:
                self._known[key] = found
        return found


def _score_one(
    client: ScoringClient,
    contexts: _Contexts,
    arm: Arm,
    item: QAItem,
    generated: dict[str, Any] | None,
    settings: LikelihoodSettings,
) -> dict[str, Any]:
    choices = answer_choices(item, settings.labels)
    reference = not choices
    if reference:
        choices = item.answers[:1]
    user = item.question
    if arm.rag:
        sources = (generated or {}).get("sources") or []
        user = rag_user_turn(
            item.question,
            sources,
            settings.headings,
            settings.max_source_chars,
            settings.source_labels,
        )
    expected = (generated or {}).get("prompt_tokens")
    try:
        ids, context = contexts.get(chat_messages(settings.system_prompt, user))
        count = len(ids)
        pairs = choice_pairs(client, settings.base_model, context, choices)
        scores, source, first = None, "echo", 0
        kept = (generated or {}).get(GENERATION_SCORES_KEY)
        if kept and not reference and count == expected:
            texts = client.token_texts(settings.base_model, [cont[-1] for _, cont in pairs])
            first = least_likely(texts, kept.get("first_top"))
            scores = scores_from_generation(pairs, ids, kept, texts)
            source = "generation" if scores is not None else source
            if scores is not None and not decided(scores, choices):
                # a bounded choice could win: score those exactly, the rest as read
                scores, source = settle_bounds(client, arm.model, pairs, scores), "generation+echo"
        if scores is None:
            scores = score_choices(
                client, arm.model, context, choices, settings.base_model, pairs=pairs, first=first
            )
    except (ScoringError, ValueError) as exc:
        # a failed question counts as wrong, never dropped (as a failed generation does)
        error = {"likelihood_error": f"{type(exc).__name__}: {exc}"}
        if reference:
            return error
        wrong = None if gold_choice(item, choices) is None else 0.0
        return {**error, **{metric: wrong for metric in LIKELIHOOD_METRICS}}
    if reference:
        per_byte = scores[0].loglikelihood / max(len(choices[0].encode("utf-8")), 1)
        measured: dict[str, Any] = {REFERENCE_METRIC: round(per_byte, 6)}
    else:
        measured = choice_metrics(scores, choices, gold_choice(item, choices))
        measured["gold_index"] = gold_choice(item, choices)
    return {
        **measured,
        CONTEXT_KEY: context,  # for the lm-eval task files; not kept in results.json
        "likelihood_prompt_tokens": count,
        "likelihood_prompt_matches": None if expected is None else count == expected,
        "likelihood_source": source,
        "likelihood_error": None,
    }


def score_arms(
    client: ScoringClient,
    arms: list[Arm],
    items: list[QAItem],
    rows_by_arm: dict[str, list[dict[str, Any]]],
    settings: LikelihoodSettings,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Add the likelihood fields to every row with an answer set; return per-arm facts
    (questions scored, errors, prompts that did not match, seconds)."""
    from tqdm import tqdm

    if settings.index_root and settings.index and not settings.headings:
        settings.headings = load_headings(settings.index_root, settings.index)
    contexts = _Contexts(client, settings.base_model)
    scorable = [item for item in items if answer_choices(item, settings.labels) or item.answers]
    facts: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rows = {row["id"]: row for row in rows_by_arm[arm.name]}
        started, prompts_before = time.perf_counter(), client.scored_prompts
        bar = tqdm(total=len(scorable), desc=f"{arm.name:>7} ll", unit="q", disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool:
            futures = {
                pool.submit(_score_one, client, contexts, arm, item, rows.get(item.id), settings): (
                    item.id
                )
                for item in scorable
            }
            for future in as_completed(futures):
                rows[futures[future]].update(future.result())
                bar.update(1)
        bar.close()
        scored = [rows[item.id] for item in scorable]
        facts[arm.name] = {
            "questions": len(scored),
            "errors": sum(bool(row.get("likelihood_error")) for row in scored),
            "prompt_mismatches": sum(
                row.get("likelihood_prompt_matches") is False for row in scored
            ),
            "from_generation": sum(row.get("likelihood_source") == "generation" for row in scored),
            "settled_by_echo": sum(
                row.get("likelihood_source") == "generation+echo" for row in scored
            ),
            "echoed_prompts": client.scored_prompts - prompts_before,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if facts[arm.name]["errors"]:
            first = next(row["likelihood_error"] for row in scored if row.get("likelihood_error"))
            logger.warning(
                "arm %s: %d likelihood errors, e.g. %s", arm.name, facts[arm.name]["errors"], first
            )
        logger.info(
            "arm %s: likelihood of %d questions in %.1fs",
            arm.name,
            len(scored),
            facts[arm.name]["seconds"],
        )
    return facts
