"""Recipes, de-duplication, split and the `ragtune prepare` command on real documents."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragtune.cli import main
from training.chunks import paragraph_chunks, split_sentences
from training.dataset import read_split
from training.dedupe import dedupe, remove_near, shingles
from training.documents import Document
from training.keywords import KeywordIndex
from training.prepare import PrepareOptions, prepare
from training.recipes import RecipeContext, get_recipe
from training.recipes.code import code_units
from training.recipes.qa import parse_pairs, reject_reason
from training.recipes.wh_questions import wh_questions
from training.split import assign_split, split_documents

SPLITS = ("train", "val", "test")


def _all_rows(out: Path) -> dict[str, list[dict]]:
    return {split: read_split(out, split) for split in SPLITS}


def test_paragraph_chunks_follow_headings_and_merge_short_blocks() -> None:
    text = (
        "# Guide\n\n## Booking\n\nShort.\n\nBook trips through the Compass desk at least ten "
        "working days ahead of the trip.\n\n## 経費\n\n経費は帰着後30日以内に申請してください。"
        "領収書は原本を提出します。\n"
    )
    chunks = paragraph_chunks(text, min_chars=20)
    assert [chunk.heading for chunk in chunks] == ["Booking", "経費"]
    assert chunks[0].text.startswith("Short. Book trips")
    assert split_sentences(chunks[1].text) == [
        "経費は帰着後30日以内に申請してください。",
        "領収書は原本を提出します。",
    ]


def test_exact_and_near_duplicates_removed_japanese_included() -> None:
    items = [
        "会議室はすべて社内システム「ルームリー」で予約します。一回の予約は最大2時間までです。"
        "定例会議でも予約は四週間先までです。",
        "会議室はすべて社内システム「ルームリー」で予約します。 一回の予約は最大2時間までです！"
        "定例会議でも予約は四週間先までです。",  # exact after normalisation
        "会議室はすべて社内システム「ルームリー」で予約します。一回の予約は最大二時間までです。"
        "定例会議でも予約は四週間先までです。",  # near
        "Passwords have at least 14 characters and use the Keystone app for MFA.",
        "Passwords have at least 14 characters and use the Keystone app for MFA!!",
        "Pallets are stacked no more than three high in the racking aisles.",
    ]
    kept, stats = dedupe(items, key=str, near_threshold=0.7)
    assert kept == [items[0], items[3], items[5]]
    assert (stats.exact, stats.near) == (2, 1)


def test_near_duplicate_confirmed_by_exact_jaccard() -> None:
    a = "Expense claims are submitted in the Ledgerly portal within 30 days after the trip."
    b = "Expense claims are submitted in the Ledgerly portal within 31 days after the trip."
    c = "Forklift drivers hold the internal F2 licence, renewed every two years."
    jaccard = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    assert jaccard > 0.8
    kept, removed = remove_near([a, b, c], key=str, threshold=0.8)
    assert kept == [a, c] and removed == 1


def test_split_is_deterministic_and_seeded() -> None:
    ids = [f"doc-{i}.md" for i in range(200)]
    first = split_documents(ids, val_ratio=0.1, test_ratio=0.2, seed=3)
    assert first == split_documents(list(reversed(ids)), val_ratio=0.1, test_ratio=0.2, seed=3)
    counts = Counter(first.values())
    assert 20 <= counts["test"] <= 60 and 5 <= counts["val"] <= 35
    assert first != split_documents(ids, val_ratio=0.1, test_ratio=0.2, seed=4)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=40, unique=True),
    st.lists(st.text(min_size=1, max_size=20), max_size=10, unique=True),
)
def test_property_adding_documents_never_moves_existing_ones(
    ids: list[str], more: list[str]
) -> None:
    for doc_id in ids:
        assert assign_split(doc_id, 0.1, 0.1) == assign_split(doc_id, 0.1, 0.1)
    before = {doc_id: assign_split(doc_id, 0.15, 0.15, seed=7) for doc_id in ids}
    after = {doc_id: assign_split(doc_id, 0.15, 0.15, seed=7) for doc_id in [*ids, *more]}
    assert all(after[doc_id] == split for doc_id, split in before.items())


@pytest.mark.parametrize("recipe", ["paragraphs", "qa", "keywords"])
def test_prepare_writes_masked_deduplicated_leak_free_splits(
    recipe: str, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stats = prepare(
        PrepareOptions(sources=[corpus], recipe=recipe, out=out, val_ratio=0.2, test_ratio=0.2)
    )
    rows = _all_rows(out)
    everything = [row for split in SPLITS for row in rows[split]]
    assert everything and all(row["recipe"] == recipe for row in everything)
    # chat format the trainer and server share
    for row in everything:
        roles = [message["role"] for message in row["messages"]]
        assert roles == ["user", "assistant"]
        assert all(message["content"].strip() for message in row["messages"])
    # no document in two splits
    docs_by_split = {split: {row["doc_id"] for row in rows[split]} for split in SPLITS}
    assert not docs_by_split["train"] & docs_by_split["val"]
    assert not docs_by_split["train"] & docs_by_split["test"]
    assert not docs_by_split["val"] & docs_by_split["test"]
    # PII is gone, placeholders are in
    blob = json.dumps(everything, ensure_ascii=False)
    assert "@orvane.example" not in blob and "090-1234-5678" not in blob
    assert "03-1234-56" not in blob and "東京都千代田区" not in blob
    assert "[EMAIL]" in blob and "[PHONE]" in blob
    assert stats["pii_masked"]["EMAIL"] == 11 and stats["pii_masked"]["PHONE"] == 11
    assert stats["pii_masked"]["POSTAL_CODE"] == 1 and stats["pii_masked"]["ADDRESS"] == 1
    # the near-copy of policy 3 is dropped before splitting
    assert stats["units_removed_near_duplicates"] == 1
    handover = {
        row["doc_id"] for row in everything if "handover log" in row["messages"][1]["content"]
    }
    assert len(handover) == 1  # only the first (by id) of the two copies survives
    assert sum(stats["examples"].values()) == len(everything)
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    # Japanese document produces Japanese prompts
    japanese = [row for row in everything if row["doc_id"] == "経費.md"]
    assert japanese and all(
        re.search(r"[\u3040-\u30ff]", row["messages"][0]["content"]) for row in japanese
    )


def test_prepare_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    a = prepare(PrepareOptions(sources=[corpus], recipe="qa", out=tmp_path / "a"))
    b = prepare(PrepareOptions(sources=[corpus], recipe="qa", out=tmp_path / "b"))
    assert a["data_hash"] == b["data_hash"]
    train_a, train_b = (tmp_path / name / "train.jsonl" for name in ("a", "b"))
    assert train_a.read_bytes() == train_b.read_bytes()


def test_qa_template_questions_answered_by_sentences(demo_docs: Path) -> None:
    document = Document(
        "it.md",
        demo_docs / "it-security.md",
        (demo_docs / "it-security.md").read_text(encoding="utf-8"),
    )
    recipe = get_recipe("qa")
    units = recipe.units(document)
    context = RecipeContext(keywords=KeywordIndex([unit.text for unit in units]))
    examples = recipe.examples(units[0], context)
    assert examples[0].messages[0]["content"] == (
        "What does the Orvane Logistics IT Security Rules say about Accounts and passwords?"
    )
    assert examples[0].messages[1]["content"] == units[0].text
    assert len(examples) >= 3
    for example in examples[1:]:
        assert example.messages[0]["content"].endswith(("?", "."))
        answer = example.messages[1]["content"]  # the sentence, or what is asked then it
        assert answer in units[0].text or answer.split(". ", 1)[1] in units[0].text
    # the authenticator app's name is asked for, not given away, and asked again under the title
    keystone = [
        e.messages[0]["content"] for e in examples if "Keystone" in e.messages[1]["content"]
    ]
    asking = [q for q in keystone if "which authenticator app" in q and "Keystone" not in q]
    assert len(asking) == 2  # in place (no auxiliary to front it with), and under the title
    answers = {e.messages[1]["content"] for e in examples if e.messages[0]["content"] in asking}
    assert {a.split(". ", 1)[0] for a in answers} == {"Keystone authenticator app"}
    assert any(
        q.startswith("According to the Orvane Logistics IT Security Rules, ") for q in asking
    )


def test_wh_questions_ask_for_the_named_term_from_the_rest_of_the_sentence() -> None:
    title = "Orvane Logistics Travel and Expenses"
    claims = (
        "Expense claims are submitted in the Ledgerly portal within 30 days after the trip ends."
    )
    assert wh_questions(claims, title) == [
        (
            "Expense claims are submitted in which portal within 30 days after the trip ends?",
            "Ledgerly portal",
        ),
        (
            "In which portal are expense claims submitted within 30 days after the trip ends?",
            "Ledgerly portal",
        ),
        (
            "Expense claims are submitted in the Ledgerly portal within how many days after the "
            "trip ends?",
            "30 days",
        ),
        (
            "Within how many days are expense claims submitted in the Ledgerly portal after the "
            "trip ends?",
            "30 days",
        ),
    ]
    # the company's own name (the title's words) is no fact to ask about
    desk = "Business trips at Orvane Logistics are booked through the Compass travel desk."
    assert [q for q, _ in wh_questions(desk, title)] == [
        "Business trips at Orvane Logistics are booked through which travel desk?",
        "Through which travel desk are business trips at Orvane Logistics booked?",
    ]
    assert wh_questions("Every accident is reported on form WS-9 within 24 hours.") == [
        ("Every accident is reported on which form within 24 hours?", "form WS-9"),
        ("Every accident is reported on form WS-9 within how many hours?", "24 hours"),
    ]
    assert wh_questions("Taxi rides are reimbursed after 22:00.") == [
        ("Taxi rides are reimbursed after what time?", "22:00"),
        ("After what time are taxi rides reimbursed?", "22:00"),
    ]
    staff = "Staff may work remotely up to three days per week."
    assert wh_questions(staff, front=False) == [
        ("Staff may work remotely up to how many days per week?", "three days")
    ]
    assert wh_questions("Laptops connect through the Tunnelway VPN outside the office.") == [
        ("Laptops connect through which VPN outside the office?", "Tunnelway VPN")
    ]
    assert wh_questions("Sick days never reduce the vacation allowance.") == []  # nothing named
    assert wh_questions("Questions go to the desk at [EMAIL].") == []  # a masked value


def test_wh_questions_on_every_demo_sentence_leave_out_what_they_ask(demo_docs: Path) -> None:
    asked = 0
    for path in sorted(demo_docs.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ")
        for chunk in paragraph_chunks(text):
            for sentence in split_sentences(chunk.text):
                for question, short in wh_questions(sentence, title):
                    asked += 1
                    assert short in sentence and short not in question, question
                    assert question.endswith("?") and question != sentence
                    kept = set(question.rstrip("?").split())
                    missing = [w for w in sentence.rstrip(".").split() if w not in kept]
                    assert missing, question  # something of the sentence is asked for
                    assert re.search(r"\b(which|what|how many)\b", question, re.I), question
    assert asked >= 50


def test_qa_model_generator_filters_and_falls_back() -> None:
    source = (
        "Customers may return goods within 21 days of delivery. Every return needs an "
        "RMA number created in the Quayside order system."
    )
    unit_doc = Document("returns.md", Path("returns.md"), f"# Returns\n\n## Window\n\n{source}\n")
    recipe = get_recipe("qa")
    (unit,) = recipe.units(unit_doc)
    replies = iter(
        [
            "Q: How many days do customers have to return goods?\nA: Within 21 days of delivery.\n"
            "Q: What is the capital of France?\nA: Paris is the capital of France.\n"
            "Q: Returns\nA: Quayside.",
            "I cannot help with that.",
        ]
    )
    context = RecipeContext(keywords=KeywordIndex([source]), generator=lambda _: next(replies))
    kept = recipe.examples(unit, context)
    assert [ex.messages[0]["content"] for ex in kept] == [
        "How many days do customers have to return goods?"
    ]
    assert context.stats["qa_rejected_ungrounded_answer"] == 1
    assert context.stats["qa_rejected_not_a_question"] == 1
    fallback = recipe.examples(unit, context)  # nothing parseable -> templates
    assert context.stats["qa_template_fallback_units"] == 1
    assert fallback[0].messages[1]["content"] == source


def test_qa_filter_rules() -> None:
    source = "会議室はルームリーで予約します。一回の予約は最大2時間までです。"
    assert reject_reason("会議室の予約は何時間までですか？", "最大2時間までです。", source) is None
    assert reject_reason("会議室の予約は？", "", source) == "empty"
    assert parse_pairs("Q: A?\nA: b\nQ: C?\nA: d") == [("A?", "b"), ("C?", "d")]


def test_qa_with_the_real_bundled_model(tmp_path: Path) -> None:
    """The model generator end to end: pairs are generated (kept or rejected) or fall back."""
    from ragtune.config import default_home
    from training.generation import LocalGenerator

    generator = LocalGenerator("bundled", default_home(), max_new_tokens=40)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "returns.md").write_text(
        "# Returns\n\nCustomers may return goods within 21 days of delivery. Every return needs "
        "an RMA number created in the Quayside order system.\n",
        encoding="utf-8",
    )
    stats = prepare(
        PrepareOptions(
            sources=[docs],
            recipe="qa",
            out=tmp_path / "out",
            qa_generator="model",
            val_ratio=0,
            test_ratio=0,
        ),
        generator=generator,
    )
    assert generator.calls == 1
    decided = sum(
        n
        for key, n in stats["recipe_stats"].items()
        if key.startswith(("qa_model_pairs_kept", "qa_rejected_"))
    )
    assert decided >= 1
    assert stats["examples"]["train"] >= 1


def test_code_recipe_docstrings_and_template_summaries(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "billing.py").write_text(
        '"""Billing helpers."""\n\n\n'
        "def net_price(gross: float, vat: float = 0.19) -> float:\n"
        '    """Remove VAT from a gross price.\n\n    Longer explanation here.\n    """\n'
        "    return round(gross / (1 + vat), 2)\n\n\n"
        "class Invoice:\n"
        "    def total(self) -> float:\n"
        "        return sum(line.amount for line in self.lines)\n",
        encoding="utf-8",
    )
    (source / "broken.py").write_text("def oops(:\n", encoding="utf-8")
    (source / "notes.md").write_text("# not code\n", encoding="utf-8")
    out = tmp_path / "out"
    stats = prepare(
        PrepareOptions(sources=[source], recipe="code", out=out, val_ratio=0, test_ratio=0)
    )
    rows = read_split(out, "train")
    by_answer = {row["messages"][1]["content"]: row["messages"][0]["content"] for row in rows}
    assert "Remove VAT from a gross price." in by_answer
    prompt = by_answer["Remove VAT from a gross price."]
    assert "def net_price(gross: float, vat: float = 0.19) -> float:" in prompt
    assert "Remove VAT" not in prompt  # docstring stripped from the code shown
    assert "`Invoice.total(self) -> float` is a function in `billing.py`; it calls `sum`." in (
        by_answer
    )
    assert stats["recipe_stats"] == {"code_docstring_summaries": 1, "code_template_summaries": 2}
    units = code_units(
        Document(
            "billing.py", source / "billing.py", (source / "billing.py").read_text(encoding="utf-8")
        )
    )
    assert [unit.heading for unit in units] == ["net_price", "Invoice", "Invoice.total"]


def test_cli_prepare_prints_stats(
    demo_docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code = main(["prepare", "--source", str(demo_docs), "--recipe", "keywords", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["documents"] == 10 and stats["pii_masked"] == {"EMAIL": 1}
    assert "examples" in printed and str(stats["examples"]["train"]) in printed


def test_cli_prepare_rejects_missing_source(tmp_path: Path) -> None:
    code = main(
        [
            "prepare",
            "--source",
            str(tmp_path / "nope"),
            "--recipe",
            "qa",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
