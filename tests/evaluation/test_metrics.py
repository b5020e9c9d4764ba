"""Metrics against hand-computed cases."""

from __future__ import annotations

import pytest

from evaluation import metrics


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Cat!", "cat"),
        ("  a   quick, brown fox. ", "quick brown fox"),
        ("Theory of an apple", "theory of apple"),  # 'the' inside a word stays
        ("", ""),
    ],
)
def test_squad_normalisation(text: str, normalised: str) -> None:
    assert metrics.normalize_answer(text) == normalised


def test_exact_match_takes_the_best_reference() -> None:
    assert metrics.exact_match("The cat.", ["a dog", "cat"]) == 1.0
    assert metrics.exact_match("the cat sat", ["cat"]) == 0.0
    assert metrics.exact_match("anything", []) is None


def test_token_f1_hand_computed() -> None:
    # prediction tokens: cat sat on mat (4); reference: cat on mat (3); common 3
    # precision 3/4, recall 1 -> F1 = 2 * 0.75 / 1.75
    f1 = metrics.token_f1("the cat sat on the mat", ["a cat on a mat"])
    assert f1 == pytest.approx(2 * 0.75 / 1.75)
    assert metrics.token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 / 1.5)  # counts clip
    assert metrics.token_f1("dog", ["cat", "dog"]) == 1.0
    assert metrics.token_f1("", ["cat"]) == 0.0
    assert metrics.token_f1("the", ["a"]) == 1.0  # both empty after normalisation


@pytest.mark.parametrize(
    ("a", "b", "length"),
    [("ABCBDAB", "BDCABA", 4), ("", "abc", 0), ("abc", "abc", 3), ("abc", "def", 0)],
)
def test_lcs_length(a: str, b: str, length: int) -> None:
    assert metrics.lcs_length(list(a), list(b)) == length


def test_rouge_l_hand_computed() -> None:
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = 3 of 4 each
    assert metrics.rouge_l("police killed the gunman", ["police kill the gunman"]) == 0.75
    # "the gunman police killed": LCS 2 ("the gunman") -> P = R = 1/2
    assert metrics.rouge_l("the gunman police killed", ["police kill the gunman"]) == 0.5
    # best reference wins; punctuation and case are ignored
    assert metrics.rouge_l("Police KILL the gunman!", ["x y", "police kill the gunman"]) == 1.0
    # unequal lengths: LCS 2, P = 2/2, R = 2/4 -> F = 2/3
    assert metrics.rouge_l("a b", ["a x b y"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l("", ["a"]) == 0.0
    assert metrics.rouge_l("a", []) is None


def test_groundedness_counts_content_tokens_only() -> None:
    source = "Aspirin is known to reduce fever in adults."
    # content tokens: aspirin, reduces, fever ("[1]" and stop words dropped); "reduces" unmatched
    assert metrics.groundedness("Aspirin reduces the fever [1].", [source]) == pytest.approx(2 / 3)
    assert metrics.groundedness("Aspirin reduces fever.", ["aspirin", "reduces fever"]) == 1.0
    assert metrics.groundedness("It is what it is.", [source]) is None  # no content tokens
    assert metrics.groundedness("Aspirin.", []) is None  # nothing retrieved


def test_recall_at_k_and_reciprocal_rank() -> None:
    sources = ["a", "a", "b", "c"]  # chunk sources in rank order
    assert metrics.recall_at_k(sources, ["b", "d"], k=2) == 0.0
    assert metrics.recall_at_k(sources, ["b", "d"], k=3) == 0.5
    assert metrics.recall_at_k(sources, ["a"], k=1) == 1.0
    assert metrics.recall_at_k(sources, [], k=3) is None
    assert metrics.reciprocal_rank(sources, ["b"]) == 0.5  # documents: a, b, c
    assert metrics.reciprocal_rank(sources, ["z"]) == 0.0
    assert metrics.reciprocal_rank(sources, []) is None


def test_file_sources_match_gold_ids_by_name_or_stem() -> None:
    path = "/srv/docs/leave-policy.md"
    assert metrics.source_matches(path, "leave-policy.md")
    assert metrics.source_matches(path, "leave-policy")
    assert metrics.source_matches(path, path)
    assert not metrics.source_matches(path, "policy")
    assert metrics.recall_at_k([path], ["leave-policy"], k=1) == 1.0
