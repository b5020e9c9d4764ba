"""`claims`: yes / no / maybe questions about the documents' own sentences, answered in the
instructed format ("Yes. <the sentence>"), so that an adapter trained on document text
keeps beginning its answers with a decision when the instruction asks for one.

Labels come from the documents, never from a benchmark: a sentence as written is a "yes";
the same sentence with a number or a direction word changed ("increased" -> "decreased")
is a "no", answered with the original sentence; a sentence that hedges ("may", "no
significant difference") is a "maybe". Plain "yes" sentences are thinned out so that the
labels stay balanced. Half of the questions come with documents in the
server's RAG prompt (the sentence's paragraph among distractors, cited as [n]), half
closed-book. English sentences only.
"""

from __future__ import annotations

import re

from training.chunks import LIST_MARKER, is_japanese, split_sentences
from training.documents import TEXT_SUFFIXES, Document
from training.recipes import RecipeContext
from training.recipes.paragraphs import document_units
from training.recipes.raft import cite, rag_prompt, rng_for, source_of
from training.records import Example, Unit, chat

LABEL_INSTRUCTION = (
    "Answer the question. Begin with yes, no or maybe, then give the main reason in one sentence."
)
TEMPLATES = ("Is it true that {claim}?", "Does the evidence show that {claim}?")
NO_SHARE = 0.6  # of the sentences that can be changed into a false claim
# of the sentences that cannot: kept as "yes" questions this often, so that yes does not
# outnumber no and maybe (a 135M adapter otherwise learns to answer "Yes." to everything)
YES_KEEP = 0.4
RAG_SHARE = 0.5
MIN_CHARS, MAX_CHARS = 40, 260

_HEDGES = re.compile(
    r"\b(may|might|could|possibl[ey]|suggests?|suggested|unclear|uncertain|inconclusive|"
    r"not (?:statistically )?significant(?:ly)?|no (?:statistically )?significant|"
    r"did not differ|remains? (?:unclear|unknown|to be)|further (?:studies|research))\b",
    re.IGNORECASE,
)
_OPPOSITES = {
    "increased": "decreased",
    "increase": "decrease",
    "increases": "decreases",
    "higher": "lower",
    "more": "less",
    "improved": "worsened",
    "reduced": "increased",
    "greater": "smaller",
    "positive": "negative",
    "positively": "negatively",
    "longer": "shorter",
    "better": "worse",
    "before": "after",
    "associated": "unassociated",
}
_OPPOSITES.update({v: k for k, v in list(_OPPOSITES.items()) if v not in _OPPOSITES})
_WORD = re.compile(r"\b(" + "|".join(sorted(_OPPOSITES, key=len, reverse=True)) + r")\b", re.I)
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.]*\d)")


def claim_text(sentence: str) -> str:
    """A sentence as the object of "Is it true that ...?" (no final stop, lower-case start
    unless it starts with an acronym or a number)."""
    text = sentence.strip().rstrip(".!?;:").strip()
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def _changed_number(match: re.Match[str]) -> str:
    raw = match.group(1)
    if "." in raw:
        decimals = len(raw.split(".")[1])
        return f"{float(raw) * 2 + 1:.{decimals}f}"
    value = int(raw)
    if 1900 <= value <= 2100:  # a year: move it, do not double it
        return str(value + 7)
    return str(value * 2 + 3 if value < 50 else value // 2)


def falsify(sentence: str) -> str | None:
    """The sentence with one direction word turned round, else one number changed; None if
    it has neither."""
    word = _WORD.search(sentence)
    if word:
        found = word.group(1)
        opposite = _OPPOSITES[found.lower()]
        if found[0].isupper():
            opposite = opposite[0].upper() + opposite[1:]
        return sentence[: word.start()] + opposite + sentence[word.end() :]
    number = _NUMBER.search(sentence)
    if number:
        return sentence[: number.start()] + _changed_number(number) + sentence[number.end() :]
    return None


def label_claim(sentence: str, key: str) -> tuple[str, str]:
    """(label, the claim asked about) for one sentence; the choice is hashed from `key`."""
    if _HEDGES.search(sentence):
        return "maybe", sentence
    false = falsify(sentence)
    if false is not None and rng_for("no", key).random() < NO_SHARE:
        return "no", false
    return "yes", sentence


def candidate_sentences(unit: Unit) -> list[str]:
    if is_japanese(unit.text) or "```" in unit.text:
        return []
    found = []
    for sentence in split_sentences(unit.text):
        marker = LIST_MARKER.match(sentence)
        sentence = sentence[marker.end() :] if marker else sentence
        if MIN_CHARS <= len(sentence) <= MAX_CHARS and sentence[-1] in ".!":
            found.append(sentence)
    return found


class ClaimsRecipe:
    name = "claims"
    suffixes = TEXT_SUFFIXES

    def __init__(self) -> None:
        self.pool: list[Unit] = []

    def units(self, document: Document) -> list[Unit]:
        units = document_units(document)
        self.pool.extend(units)
        return units

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        examples = []
        for sentence in candidate_sentences(unit)[: context.questions_per_unit + 1]:
            key = f"{unit.doc_id}\x1f{sentence}"
            label, claim = label_claim(sentence, key)
            plain_yes = label == "yes" and falsify(sentence) is None
            if plain_yes and rng_for("keep", key).random() >= YES_KEEP:
                continue
            rng = rng_for("claims", key)
            question = rng.choice(TEMPLATES).format(claim=claim_text(claim))
            answer = f"{label.capitalize()}. {sentence}"
            others = [u for u in self.pool if u.doc_id != unit.doc_id]
            if others and rng.random() < RAG_SHARE:
                picked = rng.sample(others, min(2, len(others)))
                sources = [source_of(u) for u in picked]
                position = rng.randrange(len(sources) + 1)
                sources.insert(position, source_of(unit, sentence))
                question, answer = rag_prompt(question, sources), cite(answer, position + 1)
            context.stats[f"claims_{label}"] += 1
            messages = chat(question, answer, system=LABEL_INSTRUCTION)
            examples.append(Example(unit.doc_id, self.name, messages))
        return examples
