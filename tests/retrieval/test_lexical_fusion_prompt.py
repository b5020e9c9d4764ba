from __future__ import annotations

import numpy as np
import pytest

from retrieval.fusion import fuse, rrf_fusion, zscore_fusion
from retrieval.index import SearchHit
from retrieval.lexical import LexicalIndex, lexical_tokens
from retrieval.prompt import RAG_PROMPT_TEMPLATE, format_rag_prompt


@pytest.mark.parametrize(
    ("text", "must_contain", "must_not_contain"),
    [
        ("有給休暇の申請", ["有給", "休暇", "申請", "有"], ["有給休暇の申請", "の"]),
        ("ＥＲＲ－４４７１ on VPN", ["err-4471", "err", "4471", "vpn"], ["on"]),
        ("engine.max_batch_tokens", ["engine.max_batch_tokens", "max", "batch", "tokens"], []),
        ("The Quick fox", ["quick", "fox"], ["the"]),
        ("データベース", ["デー", "ベー", "ース", "デ"], []),
    ],
)
def test_lexical_tokens(text, must_contain, must_not_contain) -> None:
    tokens = lexical_tokens(text)
    for token in must_contain:
        assert token in tokens
    for token in must_not_contain:
        assert token not in tokens


def test_bm25_matches_japanese_without_spaces(tmp_path) -> None:
    texts = [
        "有給休暇は人事システムから申請します。",
        "経費精算は経費システムで申請します。",
        "The cafeteria opens at 8am.",
    ]
    index = LexicalIndex.build(texts)
    index.save(tmp_path / "lex")
    loaded = LexicalIndex.load(tmp_path / "lex")
    ids, scores = loaded.search("有給休暇を取りたい", 3)
    assert ids.tolist() == [0]
    assert scores[0] > 0
    assert loaded.search("zzz unknown", 3)[0].size == 0


POOL = 60  # like a real candidate pool (top 50 of each retriever, merged)


def test_zscore_fusion_keeps_an_outstanding_lexical_match() -> None:
    # Dense ranks the target only 10th among near-equal cosines (an English model on a
    # Japanese query); BM25 has one outstanding match (a rare bigram or identifier).
    rng = np.random.default_rng(0)
    dense = 0.30 + 0.01 * rng.standard_normal(POOL)
    target = 7
    dense[target] = np.sort(dense)[-10]
    lexical = np.where(rng.random(POOL) < 0.3, rng.uniform(0.5, 1.5, POOL), 0.0)
    lexical[target] = 9.0
    assert int(np.argmax(zscore_fusion(dense, lexical))) == target
    assert int(np.argmax(rrf_fusion(dense, lexical))) != target  # ranks lose the margin


def test_zscore_fusion_keeps_an_outstanding_dense_match() -> None:
    rng = np.random.default_rng(1)
    dense = 0.30 + 0.03 * rng.standard_normal(POOL)
    target = 3
    dense[target] = 0.85
    lexical = rng.uniform(2.0, 2.6, POOL)  # many similar BM25 scores
    lexical[target] = np.sort(lexical)[-5]
    assert int(np.argmax(zscore_fusion(dense, lexical))) == target


def test_flat_scores_do_not_break_fusion() -> None:
    fused = fuse(np.array([0.5, 0.5]), np.zeros(2))
    assert np.all(np.isfinite(fused))


def test_rrf_weights_and_unmatched_lexical() -> None:
    fused = rrf_fusion(np.array([0.9, 0.1]), np.array([0.0, 3.0]))
    assert fused[0] == pytest.approx(1 / 61)
    assert fused[1] == pytest.approx(1 / 62 + 1 / 61)
    with pytest.raises(ValueError):
        fuse(np.zeros(2), np.zeros(2), method="magic")


def _hit(n: int, title: str, heading: tuple[str, ...], text: str) -> SearchHit:
    return SearchHit("kb", f"/docs/{n}", f"c{n}", 1.0, text, title, heading, 0, len(text), "h", n)


def test_rag_prompt_numbers_sources_in_hit_order() -> None:
    hits = [
        _hit(1, "IT handbook", ("IT handbook", "VPN"), "Renew the certificate."),
        _hit(2, "", (), "Lunch is at noon."),
    ]
    prompt = format_rag_prompt("  How do I fix ERR-4471? ", hits)
    assert prompt == RAG_PROMPT_TEMPLATE.format(
        sources="[1] Renew the certificate.\n\n[2] Lunch is at noon.",
        question="How do I fix ERR-4471?",
    )
    assert prompt.index("[1]") < prompt.index("[2]") < prompt.index("Question:")
    # retrieval.source_labels: each source's title > heading line above its text
    labelled = format_rag_prompt("  How do I fix ERR-4471? ", hits, labels=True)
    assert labelled == RAG_PROMPT_TEMPLATE.format(
        sources="[1] IT handbook > VPN\nRenew the certificate.\n\n[2] Lunch is at noon.",
        question="How do I fix ERR-4471?",
    )


def test_rag_prompt_truncates_and_handles_no_hits() -> None:
    prompt = format_rag_prompt("q", [_hit(1, "T", (), "x" * 50)], max_source_chars=10)
    assert "x" * 9 + "…" in prompt and "x" * 10 not in prompt
    assert "(no sources found)" in format_rag_prompt("q", [])
