"""PII masking for training data: an adapter memorises what it is trained on, so personal
data must be replaced by placeholders before any example is written.

Regex detectors with validation (Luhn for cards, `ipaddress` for IPs) cover emails, phone
numbers (international, North American and Japanese formats), card numbers, IPv4/IPv6 and
postal addresses where a pattern can find them (Japanese 〒 codes and prefecture addresses,
English street addresses). Presidio is used in addition only when it is importable.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PLACEHOLDERS = {
    "EMAIL": "[EMAIL]",
    "PHONE": "[PHONE]",
    "CARD": "[CARD]",
    "IP": "[IP]",
    "POSTAL_CODE": "[POSTAL_CODE]",
    "ADDRESS": "[ADDRESS]",
    "PERSON": "[PERSON]",
}

# Lookarounds use ASCII classes: Japanese text puts words right next to numbers.
# Full-width digits and dashes (common in Japanese text) are matched as their ASCII twins.
# The mapping is one character to one character, so match offsets stay valid.
_FULLWIDTH = str.maketrans(
    "０１２３４５６７８９＋（）－‐―−ー．：＠",
    "0123456789+()-----.:@",
)

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9])"
)
# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
_IPV6 = re.compile(
    r"(?<![0-9A-Fa-f:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}"
    r"(?:%[0-9A-Za-z]+)?(?![0-9A-Fa-f:])"
)
_PHONE = re.compile(
    r"(?<![A-Za-z0-9+])"
    r"(?:"
    # international: +81 3-1234-5678, +81-90-1234-5678, +1 (555) 123-4567, +44 20 7946 0958
    r"\+\d{1,3}[ -]?(?:\(\d{1,4}\)[ -]?)?\d{1,4}(?:[ -]\d{1,4}){1,4}"
    r"|\+\d{9,14}"
    # Japanese domestic: 03-1234-5678, 090-1234-5678, 0120-123-456, (03) 1234-5678
    r"|0\d{1,4}-\d{1,4}-\d{3,4}"
    r"|\(0\d{1,4}\)[ ]?\d{1,4}-\d{4}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|\(\d{3}\)[ ]?\d{3}[-. ]\d{4}"
    r"|\d{3}[-.]\d{3}[-.]\d{4}"
    r")"
    r"(?![A-Za-z0-9-])"
)
_JP_POSTAL = re.compile(r"〒[ ]?\d{3}-?\d{4}")
_PREFECTURES = (
    "北海道|東京都|京都府|大阪府|"
    "(?:青森|岩手|宮城|秋田|山形|福島|茨城|栃木|群馬|埼玉|千葉|神奈川|新潟|富山|石川|福井|山梨|"
    "長野|岐阜|静岡|愛知|三重|滋賀|兵庫|奈良|和歌山|鳥取|島根|岡山|広島|山口|徳島|香川|愛媛|高知|"
    "福岡|佐賀|長崎|熊本|大分|宮崎|鹿児島|沖縄)県"
)
# Prefecture, then city/ward/town and block numbers up to the next space or sentence mark;
# a building name written after one space is included when it ends in a room or floor
# number (〒... 横浜市中区港見台2丁目15-8 ベイコート港見台304号室).
_JP_ADDRESS = re.compile(
    rf"(?:{_PREFECTURES})[^\s、。，,.!?！？「」()（）\[\]]{{1,40}}?"
    r"(?:\d+(?:[-ー−]\d+){0,3}(?:号室?|番地?)?|丁目|番地?|号)"
    r"(?:[^\s、。，,.!?！？「」()（）\[\]]*?\d+(?:[-]\d+){0,3}(?:号室?|番地?)?)*"
    r"(?:[ \u3000][^\s、。，,.!?！？「」()（）\[\]]{1,30}?\d+(?:号室|階))?"
)
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
    r"Terrace|Parkway|Pkwy|Highway|Hwy)"
)
_EN_ADDRESS = re.compile(
    rf"\b\d{{1,6}}(?: [A-Z][a-zA-Z]+){{1,4}} {_STREET_SUFFIX}\.?"
    r"(?:,? (?:Suite|Ste\.?|Apt\.?|Unit) ?\w+)?"
    r"(?:, [A-Z][a-zA-Z]+(?: [A-Z][a-zA-Z]+)*(?:, [A-Z]{2})?(?: \d{5}(?:-\d{4})?)?)?"
)
_US_ZIP_AFTER_STATE = re.compile(r"\b[A-Z]{2} \d{5}(?:-\d{4})?\b")


def luhn_valid(digits: str) -> bool:
    """The check digit every payment card number carries; rejects most random digit runs."""
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _valid_card(text: str) -> bool:
    return luhn_valid(re.sub(r"[ -]", "", text))


def _valid_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _valid_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _valid_phone(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        return 8 <= len(digits) <= 15
    if text.startswith("0") or text.startswith("(0"):
        return 10 <= len(digits) <= 11  # Japanese numbers: 10 digits, mobiles 11
    return len(digits) == 10


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    validate: Callable[[str], bool] | None = None


# Order matters: earlier detectors win overlaps (a card number is not also a phone number,
# an email's domain digits are not an IP).
DETECTORS: tuple[_Detector, ...] = (
    _Detector("EMAIL", _EMAIL),
    _Detector("CARD", _CARD, _valid_card),
    _Detector("IP", _IPV6, _valid_ipv6),
    _Detector("IP", _IPV4, _valid_ipv4),
    _Detector("ADDRESS", _JP_ADDRESS),
    _Detector("POSTAL_CODE", _JP_POSTAL),
    _Detector("ADDRESS", _EN_ADDRESS),
    _Detector("PHONE", _PHONE, _valid_phone),
)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


@dataclass
class MaskResult:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def find_pii(text: str) -> list[Span]:
    """Non-overlapping PII spans, earlier detectors taking precedence."""
    shadow = text.translate(_FULLWIDTH)
    taken: list[Span] = []
    for detector in DETECTORS:
        for match in detector.pattern.finditer(shadow):
            if detector.validate and not detector.validate(match.group()):
                continue
            span = Span(match.start(), match.end(), detector.kind)
            if any(span.start < other.end and other.start < span.end for other in taken):
                continue
            taken.append(span)
    taken.extend(_presidio_spans(text, taken))
    return sorted(taken, key=lambda span: span.start)


def mask_pii(text: str) -> MaskResult:
    """Replace each PII span by its placeholder, e.g. `[EMAIL]`; counts per kind for stats."""
    result = MaskResult(text="")
    pieces: list[str] = []
    cursor = 0
    for span in find_pii(text):
        pieces.append(text[cursor : span.start])
        pieces.append(PLACEHOLDERS[span.kind])
        result.counts[span.kind] += 1
        cursor = span.end
    pieces.append(text[cursor:])
    result.text = "".join(pieces)
    return result


_presidio_engine: object | None = None
_presidio_checked = False


def _presidio_spans(text: str, taken: list[Span]) -> Iterator[Span]:
    """Person names (which regexes cannot find) from Presidio, when it is installed."""
    global _presidio_engine, _presidio_checked
    if not _presidio_checked:
        _presidio_checked = True
        try:
            from presidio_analyzer import AnalyzerEngine  # type: ignore[import-not-found]

            _presidio_engine = AnalyzerEngine()
        except Exception as exc:  # ImportError, or a missing spaCy model
            logger.debug("presidio unavailable (%s); using regex detectors only", exc)
            _presidio_engine = None
    if _presidio_engine is None:
        return
    for found in _presidio_engine.analyze(text=text, language="en", entities=["PERSON"]):
        span = Span(found.start, found.end, "PERSON")
        if found.score >= 0.6 and not any(
            span.start < other.end and other.start < span.end for other in taken
        ):
            yield span
