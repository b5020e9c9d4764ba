"""Questions about a sentence's named terms, asked from the rest of the sentence (English).

A template that names the sentence's keyword in its question ("What should I know about
Ledgerly?") teaches a fact backwards: the model learns term -> sentence, while users ask
from the other side ("Which portal do I submit claims in?"), and language models do not
invert what they were trained on (the "reversal curse", Berglund et al. 2023). So each named
term of a sentence (a capitalised name or code, a number, a time) is replaced in place by a
question word and the answer is the whole sentence:

    Expense claims are submitted in which portal within 30 days after the trip ends?
    -> Expense claims are submitted in the Ledgerly portal within 30 days after the trip ends.

One sentence with several terms gives several questions: the paraphrases that make injected
knowledge retrievable from other phrasings (Allen-Zhu & Li 2023, "Physics of Language Models
3.1"). Rules only, no parser: the questions are in-situ ("... in which portal ...?") and
sometimes clumsy, which is fine for training data that is never shown to users.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from training.keywords import STOPWORDS

_NUMBER_WORDS_TEXT = (
    "two three four five six seven eight nine ten eleven twelve fifteen twenty thirty"
)
NUMBER_WORDS = frozenset(_NUMBER_WORDS_TEXT.split())
_MONTHS_TEXT = (
    "january february march april may june july august september october november december"
)
MONTHS = frozenset(_MONTHS_TEXT.split())
CONNECTORS = frozenset({"to", "of"})  # inside one name: "Flag to Sentinel"
_CODE = re.compile(r"^(?:[A-Z][\w'&-]*|[A-Z]{1,4}-?\d+[A-Za-z]?)$")
_NUMBER = re.compile(r"^\d[\d,.]*$")
_TIME = re.compile(r"^\d{1,2}:\d{2}$")
_LOWER_WORD = re.compile(r"^[a-z][a-z-]*$")


@dataclass
class Token:
    lead: str  # opening punctuation: "(" or a quote
    word: str
    trail: str  # closing punctuation: ",", ".", ")" ...

    @classmethod
    def parse(cls, raw: str) -> Token:
        found = re.match(r"^([(\"'“‘]*)(.*?)([)\"'”’.,;:!?]*)$", raw)
        assert found is not None  # the pattern matches any string
        return cls(*found.groups())


def _is_name(token: Token) -> bool:
    return bool(_CODE.match(token.word)) and token.word.lower() not in MONTHS


def _is_number(token: Token) -> bool:
    return bool(_NUMBER.match(token.word) or _TIME.match(token.word)) or (
        token.word.lower() in NUMBER_WORDS
    )


def _is_noun_like(token: Token) -> bool:
    return (
        bool(_LOWER_WORD.match(token.word))
        and token.word not in STOPWORDS
        and not token.lead
        and not token.trail
    )


def _name_spans(tokens: list[Token], known: frozenset[str]) -> list[tuple[int, int]]:
    """[start, end) runs of capitalised words and codes after the first token, joined by
    "to"/"of" (a name's own connector), that are not all words in `known` (the document's
    title: the company's own name is not a fact worth asking about)."""
    spans = []
    index = 1
    while index < len(tokens):
        if not _is_name(tokens[index]) or tokens[index].lead:
            index += 1
            continue
        end = index + 1
        while end < len(tokens) and not tokens[end - 1].trail:
            nxt = tokens[end]
            if _is_name(nxt) or (nxt.word.isdigit() and not nxt.lead):
                end += 1
            elif (
                nxt.word in CONNECTORS
                and end + 1 < len(tokens)
                and not nxt.trail
                and _is_name(tokens[end + 1])
            ):
                end += 2
            else:
                break
        words = {token.word.lower().removesuffix("'s") for token in tokens[index:end]}
        if not words <= known:
            spans.append((index, end))
        index = end
    return spans


def _is_acronym(token: Token) -> bool:
    return len(token.word) >= 2 and token.word.isalpha() and token.word.isupper()


def _modifiers_before(tokens: list[Token], start: int) -> int:
    """Where the run of up to two lower-case words before `start` begins ("internal" in
    "the internal F2 forklift licence", "assembly point" in "at assembly point Gate C")."""
    first = start
    while first - 1 >= 1 and start - first < 2 and _is_noun_like(tokens[first - 1]):
        first -= 1
    return first


def _ask_name(tokens: list[Token], start: int, end: int) -> list[Token] | None:
    """The sentence with the name at [start, end) replaced by "which <noun>" or "what"."""
    if end - start >= 2 and _is_acronym(tokens[end - 1]):  # "Tunnelway VPN": ask for the VPN
        end -= 1
    last = tokens[end - 1]
    after = tokens[end] if end < len(tokens) else None
    modifies = (
        after is not None
        and not last.trail
        and (_is_noun_like(Token("", after.word, "")) or _is_acronym(after))
    )
    first = _modifiers_before(tokens, start)
    words = [Token("", token.word, "") for token in tokens[first:start]]
    determiner = tokens[first - 1] if first >= 1 else None
    if determiner is not None and determiner.word.lower() in {"the", "a", "an"}:
        if modifies:  # "the Ledgerly portal" -> "which portal"
            return _replace(tokens, first - 1, end, [Token(determiner.lead, "which", ""), *words])
        return _replace(tokens, first - 1, end, [Token(determiner.lead, "what", last.trail)])
    if modifies:  # "Every P1 incident" -> "Every which incident"
        return _replace(tokens, start, end, [Token(tokens[start].lead, "which", "")])
    if words:  # "on form WS-9" -> "on which form"
        words[-1].trail = last.trail
        return _replace(tokens, first, end, [Token(tokens[first].lead, "which", ""), *words])
    return _replace(tokens, start, end, [Token(tokens[start].lead, "what", last.trail)])


def _ask_number(tokens: list[Token], index: int) -> list[Token] | None:
    token = tokens[index]
    after = tokens[index + 1] if index + 1 < len(tokens) else None
    if _TIME.match(token.word):
        return _replace(tokens, index, index + 1, [Token(token.lead, "what time", token.trail)])
    if after is not None and after.word.lower() in MONTHS:
        return _replace(tokens, index, index + 2, [Token(token.lead, "what date", after.trail)])
    if not token.trail and after is not None and _LOWER_WORD.match(after.word):
        return _replace(tokens, index, index + 1, [Token(token.lead, "how many", "")])
    first = _modifiers_before(tokens, index)
    if first < index:  # "on internal extension 4410" -> "on which internal extension"
        words = [Token("", t.word, "") for t in tokens[first:index]]
        words[-1].trail = token.trail
        return _replace(tokens, first, index + 1, [Token("", "which", ""), *words])
    return None


AUXILIARIES = frozenset(["is", "are", "was", "were", "must", "may", "can", "should", "will"])
_PREPOSITIONS_TEXT = "in into on at through within from to for after before above below by with"
PREPOSITIONS = frozenset(_PREPOSITIONS_TEXT.split())
WH_WORDS = frozenset({"which", "what", "how many", "what time", "what date"})


def _fronted(tokens: list[Token], known: frozenset[str]) -> list[Token] | None:
    """The in-situ question with its wh-phrase (and the preposition before it) moved to the
    front before the auxiliary, as people ask ("In which portal are expense claims submitted
    ...?"), where the clause before it is simple: a subject, an auxiliary, no punctuation.
    Else None."""
    at = next((i for i, token in enumerate(tokens) if token.word in WH_WORDS), None)
    if not at or any(token.trail for token in tokens[:at]):
        return None
    if tokens[0].word.lower() in PREPOSITIONS | {"if", "once", "when", "every", "each"}:
        return None  # an introductory phrase or a quantifier, not a plain subject
    aux = next((i for i in range(1, at) if tokens[i].word.lower() in AUXILIARIES), None)
    before = [t.word.lower() for t in tokens[max(0, at - 2) : at]]
    pairs = (["up", "to"], ["at", "least"])
    if aux is None or not before or (before[-1] not in PREPOSITIONS and before not in pairs):
        return None  # the phrase must follow a preposition to move with it
    start = at - 2 if before in pairs else at - 1
    if start <= aux or _is_number(tokens[start - 1]):
        return None  # "10:00 to what time": a range, not a place to move from
    end = at + 1
    while end < len(tokens) and not tokens[end - 1].trail and _extends(tokens[end]):
        end += 1
    if end + 1 < len(tokens) and not tokens[end - 1].trail and tokens[end].word == "of":
        end += 1  # "how many days of delivery", "weeks of paid parental leave"
        while end < len(tokens) and not tokens[end - 1].trail and _extends(tokens[end]):
            end += 1
    phrase = [Token("", t.word, "") for t in tokens[start:end]]
    phrase[-1].trail = ""
    subject = [Token(t.lead, t.word, t.trail) for t in tokens[:aux]]
    first = subject[0].word
    if (first[1:].islower() and first.lower() not in known) or first == "A":
        subject[0] = Token(subject[0].lead, first.lower(), subject[0].trail)
    tail = [*tokens[aux + 1 : start], *tokens[end:]]
    if tokens[end - 1].trail and tail:
        tail[-1] = Token(tail[-1].lead, tail[-1].word, tokens[end - 1].trail)
    return [*phrase, Token("", tokens[aux].word.lower(), ""), *subject, *tail]


# lower-case words that follow a noun without extending it (adverbs, and the verbs the
# demo documents put right after a name or an amount)
_NOT_NOUNS_TEXT = (
    "instead remotely only also always never first "
    "need needs stops affects gets followed hands meets uses"
)
NOT_NOUNS = frozenset(_NOT_NOUNS_TEXT.split())


def _extends(token: Token) -> bool:
    """A word that continues a wh-phrase's noun ("which travel desk", "which HR system")."""
    bare = Token("", token.word, "")
    return (_is_noun_like(bare) and token.word not in NOT_NOUNS) or _is_acronym(token)


def _words(tokens: list[Token]) -> str:
    return " ".join(token.word for token in tokens)


def _short_name(tokens: list[Token], start: int, end: int) -> str:
    """What a question about the name at [start, end) asks for: the name with the noun it
    modifies ("Ledgerly portal", "Tunnelway VPN") or the nouns before it ("form WS-9")."""
    if end - start >= 2 and _is_acronym(tokens[end - 1]):  # "Tunnelway VPN": its own noun
        return _words(tokens[start:end])
    after = end
    while after < len(tokens) and after - end < 2 and not tokens[after - 1].trail:
        if not _extends(tokens[after]):
            break
        after += 1
    if after > end:
        return _words(tokens[start:after])
    return _words(tokens[_modifiers_before(tokens, start) : end])


def _short_number(tokens: list[Token], index: int) -> str:
    """The number with its unit ("21 days", "45 euros"), date ("31 March") or noun
    ("extension 4410"); a time alone."""
    token = tokens[index]
    after = tokens[index + 1] if index + 1 < len(tokens) else None
    if _TIME.match(token.word) or token.trail or after is None:
        first = _modifiers_before(tokens, index)
        return _words(tokens[first : index + 1]) if not _TIME.match(token.word) else token.word
    if after.word.lower() in MONTHS:
        return _words(tokens[index : index + 2])
    end = index + 1  # the unit, with up to one word before it ("27 vacation days")
    while end < len(tokens) and end - index <= 2 and not tokens[end - 1].trail:
        if not _extends(tokens[end]):
            break
        end += 1
    return _words(tokens[index:end])


def _replace(tokens: list[Token], start: int, end: int, new: list[Token]) -> list[Token]:
    return [*tokens[:start], *new, *tokens[end:]]


def _question(tokens: list[Token]) -> str:
    text = " ".join(token.lead + token.word + token.trail for token in tokens).strip()
    text = re.sub(r"[\s.,;:!]+$", "", text)
    return text[:1].upper() + text[1:] + "?"


def wh_questions(
    sentence: str, title: str = "", limit: int = 2, front: bool = True
) -> list[tuple[str, str]]:
    """(question, what it asks for) about up to `limit` named terms or numbers of
    `sentence`, each asked from the rest of it: in place, and with `front` also fronted
    where the clause allows (terms that are all words of `title` are not asked about)."""
    tokens = [Token.parse(raw) for raw in sentence.split()]
    if len(tokens) < 4 or any("[" in token.word for token in tokens):
        return []  # too short to ask from, or a masked value ("[EMAIL]") stands in the text
    known = frozenset(word.lower() for word in re.findall(r"[\w'-]+", title))
    asked: list[tuple[list[Token] | None, str]] = []
    names = _name_spans(tokens, known)
    for start, end in names:
        asked.append((_ask_name(tokens, start, end), _short_name(tokens, start, end)))
    in_names = {i for start, end in names for i in range(start, end)}
    numbers = [i for i, token in enumerate(tokens) if i and i not in in_names and _is_number(token)]
    asked.extend((_ask_number(tokens, i), _short_number(tokens, i)) for i in numbers)
    questions: list[tuple[str, str]] = []
    terms = 0
    for replaced, short in asked:
        if replaced is None or terms >= limit:
            continue
        terms += 1
        fronted = _fronted(replaced, known) if front else None
        for form in (replaced, fronted):
            if form is not None and (question := _question(form)) not in dict(questions):
                questions.append((question, short))
    return questions
