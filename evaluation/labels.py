"""Read a yes / no / maybe decision out of a free-text answer.

Small models rarely answer with the bare label, so the parser scans the answer for the first
*decisive* cue, longest phrase first: "not clear" is a hedge (maybe) before "not" is a
negation (no), "no doubt" is a yes, "not only" and an echoed option list ("yes, no or
maybe") decide nothing. Cues are whole words after
lower-casing and dropping markdown and citation markers; an answer that starts by repeating
the question has the repetition skipped, so a "not" inside the question does not count.
An answer without any cue is unparsed (None) and scores as wrong.
"""

from __future__ import annotations

import re

YES, NO, MAYBE = "yes", "no", "maybe"
_SKIP = ""  # phrases that contain a cue word but decide nothing

_CUES: dict[str, str] = {
    # hedges first in spirit: several of them contain a negation word
    "maybe": MAYBE,
    "possibly": MAYBE,
    "perhaps": MAYBE,
    "unclear": MAYBE,
    "uncertain": MAYBE,
    "unsure": MAYBE,
    "unknown": MAYBE,
    "inconclusive": MAYBE,
    "controversial": MAYBE,
    "debatable": MAYBE,
    "equivocal": MAYBE,
    "partially": MAYBE,
    "partly": MAYBE,
    "it depends": MAYBE,
    "depends on": MAYBE,
    "may or may not": MAYBE,
    "yes and no": MAYBE,
    "not clear": MAYBE,
    "not certain": MAYBE,
    "not sure": MAYBE,
    "not known": MAYBE,
    "not conclusive": MAYBE,
    "not necessarily": MAYBE,
    "not always": MAYBE,
    "not straightforward": MAYBE,
    "not yet clear": MAYBE,
    "not fully": MAYBE,
    "not enough evidence": MAYBE,
    "not enough data": MAYBE,
    "no clear evidence": MAYBE,
    "no conclusive evidence": MAYBE,
    "insufficient evidence": MAYBE,
    "insufficient data": MAYBE,
    "limited evidence": MAYBE,
    "mixed evidence": MAYBE,
    "mixed results": MAYBE,
    "cannot be determined": MAYBE,
    "can not be determined": MAYBE,
    "cannot be concluded": MAYBE,
    "cannot say": MAYBE,
    "can't say": MAYBE,
    "hard to say": MAYBE,
    "difficult to say": MAYBE,
    "remains to be": MAYBE,
    "further research": MAYBE,
    "further studies": MAYBE,
    # negations
    "no": NO,
    "not": NO,
    "nope": NO,
    "never": NO,
    "none": NO,
    "neither": NO,
    "nor": NO,
    "cannot": NO,
    "can't": NO,
    "don't": NO,
    "doesn't": NO,
    "didn't": NO,
    "isn't": NO,
    "aren't": NO,
    "wasn't": NO,
    "weren't": NO,
    "won't": NO,
    "wouldn't": NO,
    "shouldn't": NO,
    "unlikely": NO,
    "false": NO,
    "incorrect": NO,
    "no evidence": NO,
    "probably not": NO,
    "likely not": NO,
    "not likely": NO,
    "does not": NO,
    # affirmatives
    "yes": YES,
    "yeah": YES,
    "yep": YES,
    "indeed": YES,
    "correct": YES,
    "true": YES,
    "certainly": YES,
    "definitely": YES,
    "absolutely": YES,
    "affirmative": YES,
    "likely": YES,
    "probably": YES,
    "no doubt": YES,
    "without doubt": YES,
    "not unlikely": YES,
    # the model repeating the instruction's option list is not an answer
    "yes no or maybe": _SKIP,
    "yes no maybe": _SKIP,
    "yes or no or maybe": _SKIP,
    "yes or no": _SKIP,
    "no or maybe": _SKIP,
    "not only": _SKIP,
    "no matter": _SKIP,
    "whether or not": _SKIP,
    "if not": _SKIP,
    "not to mention": _SKIP,
}
_PHRASES = {tuple(key.split()): value for key, value in _CUES.items()}
_LONGEST = max(len(key) for key in _PHRASES)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NOISE = re.compile(r"\[\d+(?:\s*[,-]\s*\d+)*\]|[*_`#>]")


def words(text: str) -> list[str]:
    """Lower-case words, apostrophe contractions kept whole ("doesn't"); curly quotes folded."""
    text = _NOISE.sub(" ", text.lower().replace("\u2019", "'"))
    return _WORD.findall(text)


def _strip_echo(tokens: list[str], question: str | None) -> list[str]:
    if not question:
        return tokens
    echoed = words(question)
    if echoed and tokens[: len(echoed)] == echoed:
        return tokens[len(echoed) :]
    return tokens


def parse_label(
    text: str, question: str | None = None, labels: tuple[str, ...] = (YES, NO, MAYBE)
) -> str | None:
    """The first decisive cue's label, restricted to `labels` (a hedge in a yes/no task is
    unparsed, not "maybe"); None when the answer decides nothing."""
    tokens = _strip_echo(words(text), question)
    custom = {label.lower() for label in labels} - {YES, NO, MAYBE}
    position = 0
    while position < len(tokens):
        for size in range(min(_LONGEST, len(tokens) - position), 0, -1):
            phrase = tuple(tokens[position : position + size])
            label = _PHRASES.get(phrase)
            if label is None and size == 1 and phrase[0] in custom:
                label = phrase[0]
            if label is None:
                continue
            if label == _SKIP:
                position += size - 1
                break
            return label if label in labels else None
        position += 1
    return None
