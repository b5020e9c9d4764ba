"""PII masking on real text, English and Japanese, plus property tests."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.pii import find_pii, luhn_valid, mask_pii


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mail taro.yamada@example.co.jp today.", "Mail [EMAIL] today."),
        ("Call 03-1234-5678 now.", "Call [PHONE] now."),
        ("携帯は090-1234-5678です。", "携帯は[PHONE]です。"),
        ("Tokyo office: +81 3-1234-5678.", "Tokyo office: [PHONE]."),
        ("Mobile +81-90-1234-5678 or +819012345678.", "Mobile [PHONE] or [PHONE]."),
        ("電話：０３－１２３４－５６７８", "電話：[PHONE]"),
        ("Free dial 0120-123-456.", "Free dial [PHONE]."),
        ("US desk (555) 123-4567 or 555-123-4567.", "US desk [PHONE] or [PHONE]."),
        ("Card 4111 1111 1111 1111 on file.", "Card [CARD] on file."),
        ("Card 4111-1111-1111-1111.", "Card [CARD]."),
        ("Host 192.168.10.1 is down.", "Host [IP] is down."),
        ("Use 2001:db8::8a2e:370:7334 or fe80::1%eth0.", "Use [IP] or [IP]."),
        ("〒100-0001 東京都千代田区千代田1-1 に送付。", "[POSTAL_CODE] [ADDRESS] に送付。"),
        ("本社は大阪府大阪市北区梅田3丁目1番1号です。", "本社は[ADDRESS]です。"),
        (
            "Ship to 1600 Amphitheatre Parkway, Mountain View, CA 94043 please.",
            "Ship to [ADDRESS] please.",
        ),
    ],
)
def test_masks_pii(text: str, expected: str) -> None:
    assert mask_pii(text).text == expected


@pytest.mark.parametrize(
    "text",
    [
        "Invoice 4111 1111 1111 1112 failed the check digit.",  # Luhn-invalid: not a card
        "Released on 2024-01-15 at 12:30:45 as version 1.2.3.4.5.",
        "ISBN 978-4-06-123456-7, order 12345678, room 301, 27 vacation days.",
        "Gather at Gate C; P1 incidents are acknowledged within five minutes.",
        "会議室は最大2時間まで予約できます。",
        "Extension 4410 and build 20240115.",
    ],
)
def test_leaves_non_pii_alone(text: str) -> None:
    assert mask_pii(text).text == text


def test_counts_by_kind() -> None:
    result = mask_pii("a@b.example, c@d.example, 090-1234-5678, 10.0.0.1")
    assert dict(result.counts) == {"EMAIL": 2, "PHONE": 1, "IP": 1}


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("5500005555555559")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("41111")


def _luhn_complete(prefix: str) -> str:
    for check in "0123456789":
        if luhn_valid(prefix + check):
            return prefix + check
    raise AssertionError("unreachable")


words = st.text(alphabet="abcdefghij klmnopqrstuvwxyz.,あいうえお会議室", max_size=60)


@settings(max_examples=150, deadline=None)
@given(prefix=words, suffix=words, digits=st.text(alphabet="0123456789", min_size=14, max_size=14))
def test_property_luhn_cards_always_masked(prefix: str, suffix: str, digits: str) -> None:
    card = _luhn_complete("4" + digits)
    grouped = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    masked = mask_pii(f"{prefix} {grouped} {suffix}").text
    assert card not in re.sub(r"\D", "", masked)
    assert "[CARD]" in masked


@settings(max_examples=150, deadline=None)
@given(
    user=st.from_regex(r"[a-z][a-z0-9._]{0,12}[a-z0-9]", fullmatch=True),
    domain=st.from_regex(r"[a-z]{2,10}\.(com|jp|co\.jp|example)", fullmatch=True),
    before=words,
    after=words,
)
def test_property_emails_always_masked(user: str, domain: str, before: str, after: str) -> None:
    email = f"{user}@{domain}"
    masked = mask_pii(f"{before} {email} {after}").text
    assert email not in masked
    assert "@" not in masked


@settings(max_examples=150, deadline=None)
@given(
    area=st.sampled_from(["03", "06", "090", "080", "070", "0120"]),
    middle=st.integers(0, 999),
    last=st.integers(0, 9999),
    text=words,
)
def test_property_japanese_phones_masked(area: str, middle: int, last: int, text: str) -> None:
    width = 3 if area == "0120" else 4
    number = f"{area}-{middle:0{width}d}-{last:04d}"
    digits = re.sub(r"\D", "", number)
    if not 10 <= len(digits) <= 11:
        return
    masked = mask_pii(f"{text} {number}").text
    assert number not in masked


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_property_masking_is_idempotent(text: str) -> None:
    once = mask_pii(text).text
    assert mask_pii(once).text == once


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Nd", "No")), max_size=200))
def test_property_text_without_digits_or_at_is_unchanged(text: str) -> None:
    text = text.replace("@", "").replace("＠", "")
    assert find_pii(text) == []
