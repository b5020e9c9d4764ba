"""`raft`: knowledge examples that keep the way answers are asked for and given.

Retrieval-Augmented Fine-Tuning (Zhang et al. 2024, RAFT): each question (the `qa`
recipe's pairs, template or model-generated) comes with documents in the server's own RAG
prompt (`retrieval.prompt`), the paragraph that answers it among distractor paragraphs
from other documents, and the answer quotes that paragraph and cites it as [n]. In a share
of the examples (1 - `ORACLE_SHARE`) the answering paragraph is left out and the answer is
still given, so the facts also go into the weights. Every pair is also kept closed-book
(question -> answer, no documents), which is what the `ft` arm is asked; an answer asked
about several ways (the `qa` templates' paraphrases) gets RAG examples for its first two
questions only, since a RAG example costs several closed-book ones to train.

Distractors are drawn from the whole corpus, which the recipe sees through `units()`
(prepare cuts every document before it makes any example); choices hash the question, so
the output is deterministic. Sources are cut to `SOURCE_CHARS` around what the answer
quotes, which keeps the examples a few hundred tokens long for CPU training.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass

from training.chunks import is_japanese
from training.documents import TEXT_SUFFIXES, Document
from training.recipes import RecipeContext
from training.recipes.paragraphs import document_units
from training.recipes.qa import model_pairs, quoted, template_pairs
from training.records import Example, Unit, chat

DISTRACTORS = 2  # with the answering paragraph: the bench's top_k of 3
RAG_PER_ANSWER = 2  # of an answer's questions (paraphrases), the first two get a RAG example
ORACLE_SHARE = 0.8  # RAFT's P: the answering paragraph is in the context
SOURCE_CHARS = 280
SOURCE_CHARS_JA = 140  # Japanese packs about twice the tokens per character


@dataclass(frozen=True)
class Source:
    """What `retrieval.prompt.format_rag_prompt` reads from a hit."""

    title: str
    heading: tuple[str, ...]
    text: str


def rng_for(*parts: str) -> random.Random:
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def excerpt(text: str, quote: str = "", limit: int | None = None) -> str:
    """At most about `limit` characters of `text`, cut with "…", with `quote` inside."""
    text = " ".join(text.split())
    limit = limit or source_chars(text)
    if len(text) <= limit:
        return text
    width = limit - 2
    at = text.find(quote) if quote else -1
    start = 0
    if at >= 0 and at + len(quote) > width:
        start = max(0, min(at - max(0, width - len(quote)) // 2, len(text) - width))
    body = text[start : start + width].strip()
    return ("…" if start else "") + body + ("…" if start + width < len(text) else "")


def source_chars(text: str) -> int:
    return SOURCE_CHARS_JA if is_japanese(text) else SOURCE_CHARS


def source_of(unit: Unit, quote: str = "") -> Source:
    heading = (unit.heading,) if unit.heading and unit.heading != unit.title else ()
    return Source(unit.title, heading, excerpt(unit.text, quote))


def rag_prompt(question: str, sources: list[Source], labels: bool = False) -> str:
    """The user turn the server builds for a RAG request (one template for both; `labels`:
    the server's `retrieval.source_labels`)."""
    from retrieval.prompt import format_rag_prompt

    return format_rag_prompt(question, sources, labels=labels)


def cite(answer: str, number: int) -> str:
    """The answer with its source cited as the RAG prompt asks: "... [2]."."""
    stripped = answer.rstrip()
    end = stripped[-1] if stripped and stripped[-1] in ".!?。！？" else ""
    body = stripped[: len(stripped) - len(end)] if end else stripped
    return f"{body} [{number}]{end}"


def with_context(
    question: str,
    answer: str,
    gold: Unit,
    pool: list[Unit],
    *,
    oracle: bool,
    rng: random.Random,
    labels: bool = False,
) -> tuple[str, str]:
    """(RAG user turn, cited answer): `gold` among distractors from other documents, or
    only distractors (the answer then comes from memory and cites nothing)."""
    others = [unit for unit in pool if unit.doc_id != gold.doc_id]
    count = DISTRACTORS + (0 if oracle else 1)
    picked = rng.sample(others, min(count, len(others)))
    sources = [source_of(unit) for unit in picked]
    if not oracle:
        return rag_prompt(question, sources, labels), answer
    position = rng.randrange(len(sources) + 1)
    sources.insert(position, source_of(gold, answer))
    return rag_prompt(question, sources, labels), cite(answer, position + 1)


class RaftRecipe:
    name = "raft"
    suffixes = TEXT_SUFFIXES

    def __init__(self) -> None:
        self.pool: list[Unit] = []

    def units(self, document: Document) -> list[Unit]:
        units = document_units(document)
        self.pool.extend(units)
        return units

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        pairs: list[tuple[str, str]] = []
        if context.generator is not None:
            pairs = model_pairs(unit, context)
        if not pairs:
            pairs = template_pairs(unit, context)
        examples = []
        in_context: Counter[str] = Counter()
        for question, closed_book in pairs:
            examples.append(Example(unit.doc_id, "raft-closed-book", chat(question, closed_book)))
            answer = quoted(closed_book, unit.text)  # with the document, the answer quotes it
            if in_context[answer] >= RAG_PER_ANSWER:
                continue  # a RAG example costs ~5x a closed-book one to train
            in_context[answer] += 1
            rng = rng_for(unit.doc_id, question, answer)
            oracle = rng.random() < ORACLE_SHARE
            if len(answer) > source_chars(answer) - 2 or len({u.doc_id for u in self.pool}) < 2:
                continue  # a whole-paragraph answer, or no other document to distract with
            user, cited = with_context(
                question,
                answer,
                unit,
                self.pool,
                oracle=oracle,
                rng=rng,
                labels=context.source_labels,
            )
            context.stats["raft_oracle" if oracle else "raft_distractors_only"] += 1
            examples.append(Example(unit.doc_id, self.name, chat(user, cited)))
        return examples
