"""Stop strings and incremental detokenization, with the real bundled tokenizer."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.stop import StopMatcher


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "stopped"),
    [
        (("END",), ["abc", "E", "N", "D", "zzz"], "abc", True),
        (("END",), ["abcEN", "Dx"], "abc", True),
        (("END",), ["abcEN", "O"], "abcENO", False),
        (("END",), ["abcE"], "abcE", False),  # held-back text is released at the end
        (("\n\n", "###"), ["a\n", "b#", "##c"], "a\nb", True),
        (("。",), ["東京は", "日本の首都です", "。次"], "東京は日本の首都です", True),
        ((), ["a", "b"], "ab", False),
    ],
)
def test_stop_matcher_cuts_before_the_match(stops, pieces, expected, stopped):
    assert feed_all(stops, pieces) == (expected, stopped)


@given(
    text=st.text(alphabet="abcXY\n。", max_size=60),
    stop=st.text(alphabet="abcXY\n。", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_stop_matcher_equals_cutting_the_whole_text(text, stop, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = feed_all((stop,), pieces)
    index = text.find(stop)
    if index >= 0:
        assert stopped and out == text[:index]
    else:
        assert not stopped and out == text
    assert stop not in out


@pytest.mark.parametrize(
    "text",
    [
        "東京は日本の首都です。富士山は高い。",
        "Grüße aus Köln — naïve café 🍵 test",
        "Hello world, plain ASCII.",
        "混合 text with 日本語 and emoji 🎉🎉",
    ],
)
def test_incremental_detokenizer_never_emits_broken_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
