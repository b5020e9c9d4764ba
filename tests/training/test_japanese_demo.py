"""The Japanese demo corpus (data/demo-ja): `ragtune prepare` over the real documents masks
their PII, cuts Japanese text at sentence ends, and the held-out questions match the docs."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from retrieval.chunking import ApproxTokenCounter, chunk_document
from retrieval.loaders import load_file
from training.chunks import paragraph_chunks, split_sentences
from training.pii import mask_pii
from training.prepare import PrepareOptions, prepare

DEMO_JA = Path(__file__).resolve().parents[2] / "data" / "demo-ja"
DOCS = DEMO_JA / "docs"
QUESTIONS = DEMO_JA / "eval_questions.jsonl"

# Every contact detail written into the docs (担当者連絡先, 記入例): none may reach training data.
PII_SAMPLES = {
    "security-incident-report.md": [
        "090-0000-2983",
        "kuroda.security@orvane.example",
        "03-0000-7730",
        "sec-oncall@orvane.example",
        "105-0099",
        "東京都港区汐凪三丁目4-18",
        "オルヴェーン汐凪ビル9階",
    ],
    "onboarding.md": [
        "231-0099",
        "神奈川県横浜市中区港見台2丁目15-8",
        "ベイコート港見台304号室",
        "045-000-3318",
        "080-0000-7261",
        "0463-00-4475",
        "hanako.yamada.sample@mail.example",
    ],
}
SENTENCE_END = ("。", "！", "？")


def _docs() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md"))}


def _prepared_text(out: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(out.iterdir()))


def _ends_cleanly(chunk: str, doc: str) -> bool:
    """At a sentence end, or where its source block ends (a line end in the document)."""
    tail = chunk.rstrip()[-12:]
    return tail.endswith(SENTENCE_END) or tail + "\n" in doc or doc.rstrip().endswith(tail)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    runs = {}
    for recipe in ("qa", "paragraphs"):
        out = tmp_path_factory.mktemp("prepared") / recipe
        options = PrepareOptions(
            sources=[DOCS], recipe=recipe, out=out, val_ratio=0.0, test_ratio=0.0
        )
        runs[recipe] = (out, prepare(options))
    return runs


def test_corpus_shape() -> None:
    docs = _docs()
    assert 8 <= len(docs) <= 10
    for name, text in docs.items():
        body = "".join(text.split())
        assert 1500 <= len(body) <= 3500, name
        assert text.startswith("# ") and "\n## " in text, name
        assert re.search(r"[\u3040-\u309f]", text), name  # written in Japanese


@pytest.mark.parametrize("recipe", ["qa", "paragraphs"])
def test_prepare_writes_records(recipe: str, prepared: dict[str, tuple[Path, dict]]) -> None:
    out, stats = prepared[recipe]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert stats["documents"] == len(_docs())
    assert len(rows) == stats["examples"]["train"] > 0
    assert {row["doc_id"] for row in rows} == set(_docs())
    if recipe == "qa":  # the topic question plus questions about single sentences
        assert len(rows) > 3 * stats["units"]
    for row in rows:
        user, assistant = (message["content"] for message in row["messages"])
        assert user.endswith(("？", "。")) and assistant


def test_qa_sentence_answers_drop_list_markers(prepared: dict[str, tuple[Path, dict]]) -> None:
    def answers(recipe: str) -> set[str]:
        lines = (prepared[recipe][0] / "train.jsonl").read_text(encoding="utf-8").splitlines()
        return {json.loads(line)["messages"][-1]["content"] for line in lines}

    paragraphs = answers("paragraphs")
    sentences = answers("qa") - paragraphs  # the per-sentence questions' answers
    assert len(sentences) > 150
    assert [a for a in sentences if re.match(r"(?:[-*・]|\d{1,2}[.)])\s", a)] == []


def test_every_pii_sample_is_masked(prepared: dict[str, tuple[Path, dict]]) -> None:
    docs = _docs()
    for doc_id, samples in PII_SAMPLES.items():
        for sample in samples:
            assert sample in docs[doc_id], sample  # the sample really is in the corpus
    for out, stats in prepared.values():
        text = _prepared_text(out)
        leaked = [
            sample for samples in PII_SAMPLES.values() for sample in samples if sample in text
        ]
        assert leaked == []
        assert stats["pii_masked"] == {"ADDRESS": 2, "EMAIL": 3, "PHONE": 5, "POSTAL_CODE": 2}
        assert "[PHONE]" in text and "[ADDRESS]" in text
    # Nothing else in the corpus looks like PII (form codes, 内線 numbers, amounts survive).
    masked: Counter[str] = Counter()
    for text in docs.values():
        masked.update(mask_pii(text).counts)
    assert masked == Counter(ADDRESS=2, EMAIL=3, PHONE=5, POSTAL_CODE=2)


@pytest.mark.parametrize("max_chars", [1200, 150])
def test_training_chunks_end_at_sentences(max_chars: int) -> None:
    for name, doc in _docs().items():
        chunks = paragraph_chunks(doc, max_chars=max_chars)
        assert chunks, name
        for chunk in chunks:
            chunk.text.encode("utf-8", errors="strict")
            assert len(chunk.text) <= max_chars or "```" in chunk.text, (name, chunk.text)
            assert _ends_cleanly(chunk.text, doc), (name, chunk.text[-40:])
        # Nothing lost, nothing cut inside a character: the chunks hold every body line.
        body, fenced = [], False
        for line in doc.splitlines():
            fenced ^= line.startswith("```")
            if fenced or line.startswith("```") or not line.startswith("#"):
                body.append(line)
        assert "".join("".join(c.text for c in chunks).split()) == "".join("".join(body).split())


def test_sentences_split_at_japanese_marks_and_list_items() -> None:
    text = paragraph_chunks((DOCS / "onboarding.md").read_text(encoding="utf-8"))
    courses = next(chunk.text for chunk in text if "行動規範" in chunk.text)
    assert split_sentences(courses)[-3:] == [
        "1. 情報セキュリティ基礎（約60分）",
        "2. 個人情報保護の基本（約40分）",
        "3. 行動規範（約30分）",
    ]
    assert split_sentences("窓口は内線7119です。24時間つながります！本当ですか？はい。") == [
        "窓口は内線7119です。",
        "24時間つながります！",
        "本当ですか？",
        "はい。",
    ]


def test_retrieval_chunks_end_at_sentences() -> None:
    counter = ApproxTokenCounter()
    for path in sorted(DOCS.glob("*.md")):
        doc = load_file(path)
        for chunk in chunk_document(doc, max_tokens=200, overlap=40, counter=counter):
            assert chunk.text == doc.text[chunk.start : chunk.end]
            assert len(counter.spans(chunk.text)) <= 200
            assert chunk.text.endswith(SENTENCE_END) or doc.text[chunk.end : chunk.end + 1] in (
                "\n",
                "",
            ), (path.name, chunk.text[-40:])


def test_eval_questions_are_well_formed(prepared: dict[str, tuple[Path, dict]]) -> None:
    docs = _docs()
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20
    assert len({row["question"] for row in rows}) == 20
    per_doc = Counter(row["doc_id"] for row in rows)
    assert set(per_doc) == set(docs) and all(2 <= n <= 3 for n in per_doc.values())
    training_text = _prepared_text(prepared["qa"][0])
    for row in rows:
        assert set(row) == {"doc_id", "question", "answer", "keywords"}
        assert row["question"].endswith("？") and row["answer"].endswith("。")
        assert row["keywords"] and all(isinstance(k, str) and k for k in row["keywords"])
        for keyword in row["keywords"]:
            assert keyword in docs[row["doc_id"]], (row["doc_id"], keyword)
            assert keyword in training_text, keyword  # not masked away
        assert any(keyword in row["answer"] for keyword in row["keywords"]), row["answer"]
        assert row["question"] not in training_text  # held out
