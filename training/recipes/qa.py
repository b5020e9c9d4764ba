"""`qa`: question/answer pairs per paragraph, generated offline.

`--qa-generator model` asks a local model (the bundled base by default) for pairs and keeps
only those that pass `reject_reason`; a paragraph whose pairs were all rejected falls back
to the deterministic templates, which `--qa-generator template` uses throughout.
"""

from __future__ import annotations

import hashlib
import re

from training.chunks import LIST_MARKER, is_japanese, split_sentences
from training.documents import TEXT_SUFFIXES, Document
from training.keywords import terms
from training.recipes import RecipeContext
from training.recipes.paragraphs import document_units, topic_question
from training.recipes.wh_questions import wh_questions
from training.records import Example, Unit, chat

EN_TEMPLATES = (
    "What does the {title} say about {k1}?",
    "What should I know about {k1} and {k2}?",
    "What is the rule for {k1}?",
    "Tell me about {k1} ({topic}).",
)
JA_TEMPLATES = (
    "{k1}について教えてください。",
    "{title}では{k1}と{k2}についてどう定められていますか？",
    "{k1}のルールは何ですか？",
)

QA_INSTRUCTION = (
    "Read the text and write one question that an employee might ask and that the text "
    "answers, then the answer in one or two sentences taken from the text.\n"
    "Reply exactly in this format:\nQ: <question>\nA: <answer>\n\nText:\n{text}"
)
QA_INSTRUCTION_JA = (
    "次の文章を読み、社員がしそうな質問を一つと、その答えを文章から一、二文で書いてください。\n"
    "必ず次の形式で答えてください：\nQ: <質問>\nA: <答え>\n\n文章：\n{text}"
)
_PAIR = re.compile(r"Q[:：]\s*(?P<q>.+?)\s*\n+\s*A[:：]\s*(?P<a>.+?)(?=\n\s*Q[:：]|\Z)", re.S)


def template_pairs(unit: Unit, context: RecipeContext) -> list[tuple[str, str]]:
    """The paragraph's topic question, then for each of up to `questions_per_unit`
    informative sentences: in English, questions asking for its named terms from the rest of
    it, in place and fronted (`wh_questions`), the first also under the document's title,
    answered fact first (`fact_first`); else (Japanese, or an English sentence with no term
    to ask for) one question from its keywords (template picked by a hash, so output is
    deterministic)."""
    pairs = [(topic_question(unit), unit.text)]
    if "```" in unit.text or "~~~" in unit.text:  # code has no sentences to ask about
        return pairs
    japanese = is_japanese(unit.text)
    templates = JA_TEMPLATES if japanese else EN_TEMPLATES
    asked = 0
    for sentence in split_sentences(unit.text):
        marker = LIST_MARKER.match(sentence)  # "- " or "2. " of a list item
        sentence = sentence[marker.end() :] if marker else sentence
        if asked >= context.questions_per_unit:
            break
        if len(sentence) < (12 if japanese else 30):
            continue
        questions = [] if japanese else wh_questions(sentence, unit.title)
        if questions:
            asked += 1
            pairs += [(question, fact_first(short, sentence)) for question, short in questions]
            question, short = questions[0]
            pairs.append((under_title(question, unit.title), fact_first(short, sentence)))
            continue
        keywords = context.keywords.keywords(sentence, k=2)
        if not keywords:
            continue
        asked += 1
        k1, k2 = keywords[0], keywords[-1]
        if k1 == k2 and "{k2}" in templates[1]:
            k2 = unit.heading or unit.title
        pick = int(hashlib.sha256(sentence.encode()).hexdigest(), 16) % len(templates)
        question = templates[pick].format(
            title=unit.title, topic=unit.heading or unit.title, k1=k1, k2=k2
        )
        pairs.append((question, sentence))
    return pairs


def fact_first(short: str, sentence: str) -> str:
    """What a question asks for, then the sentence that says it ("Ledgerly portal. Expense
    claims are submitted in the Ledgerly portal ..."): an answer that restates the question
    cannot leave the fact out."""
    return f"{short[:1].upper()}{short[1:]}. {sentence}"


def quoted(answer: str, text: str) -> str:
    """The part of an answer that quotes `text`: the answer itself, or after `fact_first`'s
    fact, the sentence."""
    if answer in text:
        return answer
    _, _, rest = answer.partition(". ")
    return rest if rest and rest in text else answer


def under_title(question: str, title: str) -> str:
    """The question asked of one document: "According to the <title>, ...?" (the title names
    the company, as users' questions do)."""
    first = question.split(" ", 1)[0]
    lowered = (
        first.lower() + question[len(first) :] if first[1:].islower() or first == "A" else question
    )
    return f"According to the {title}, {lowered}"


def parse_pairs(generated: str) -> list[tuple[str, str]]:
    return [(m.group("q").strip(), m.group("a").strip()) for m in _PAIR.finditer(generated)]


def reject_reason(question: str, answer: str, source: str) -> str | None:
    """Why a generated pair is unusable, or None to keep it."""
    if not question or not answer:
        return "empty"
    if not question.rstrip().endswith(("?", "？")):
        return "not_a_question"
    japanese = is_japanese(source)
    q_len = len(question) if japanese else len(question.split())
    a_len = len(answer) if japanese else len(answer.split())
    if not (5 <= q_len <= 120 if japanese else 3 <= q_len <= 40):
        return "question_length"
    if not (2 <= a_len <= 300 if japanese else 1 <= a_len <= 80):
        return "answer_length"
    if answer.strip().casefold() == question.strip().casefold():
        return "answer_repeats_question"
    if "<" in question or "<" in answer or "Q:" in answer:
        return "format"
    answer_terms = set(terms(answer))
    source_terms = set(terms(source))
    if answer_terms and len(answer_terms & source_terms) / len(answer_terms) < 0.6:
        return "ungrounded_answer"
    if not set(terms(question)) & source_terms:
        return "off_topic_question"
    return None


def model_pairs(unit: Unit, context: RecipeContext) -> list[tuple[str, str]]:
    assert context.generator is not None
    instruction = QA_INSTRUCTION_JA if is_japanese(unit.text) else QA_INSTRUCTION
    generated = context.generator([{"role": "user", "content": instruction.format(text=unit.text)}])
    kept: list[tuple[str, str]] = []
    for question, answer in parse_pairs(generated) or [("", "")]:
        reason = reject_reason(question, answer, unit.text)
        if reason is None and all(question != seen for seen, _ in kept):
            kept.append((question, answer))
            context.stats["qa_model_pairs_kept"] += 1
        else:
            context.stats[f"qa_rejected_{reason or 'duplicate'}"] += 1
    return kept


class QARecipe:
    name = "qa"
    suffixes = TEXT_SUFFIXES

    def units(self, document: Document) -> list[Unit]:
        return document_units(document)

    def examples(self, unit: Unit, context: RecipeContext) -> list[Example]:
        pairs: list[tuple[str, str]] = []
        if context.generator is not None:
            pairs = model_pairs(unit, context)
            if not pairs:
                context.stats["qa_template_fallback_units"] += 1
        if not pairs:
            pairs = template_pairs(unit, context)
        return [Example(unit.doc_id, self.name, chat(q, a)) for q, a in pairs]
