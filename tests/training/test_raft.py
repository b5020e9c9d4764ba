"""The `raft` and `claims` recipes on the real demo documents: knowledge examples in the
server's own RAG prompt with the answering paragraph among distractors, and yes / no /
maybe questions answered in the instructed format."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from retrieval.prompt import RAG_PROMPT_TEMPLATE
from training.dataset import read_split
from training.prepare import PrepareOptions, prepare
from training.recipes.claims import LABEL_INSTRUCTION, claim_text, falsify, label_claim
from training.recipes.raft import cite, excerpt

_SOURCE = re.compile(r"^\[(\d+)\] (.+?)(?=\n\n\[\d+\]|\n\nQuestion: )", re.S | re.M)


def run(recipe: str, docs: Path, out: Path) -> list[dict]:
    prepare(PrepareOptions(sources=[docs], recipe=recipe, out=out, val_ratio=0.0, test_ratio=0.0))
    return read_split(out, "train")


def sources_of(user: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in _SOURCE.finditer(user)}


def test_raft_examples_put_the_answer_among_distractors(demo_docs: Path, tmp_path: Path) -> None:
    rows = run("raft", demo_docs, tmp_path / "a")
    assert rows == run("raft", demo_docs, tmp_path / "b")  # deterministic
    kinds = Counter(row["recipe"] for row in rows)
    assert kinds["raft-closed-book"] > 0 and kinds["raft"] > 0
    closed = [r for r in rows if r["recipe"] == "raft-closed-book"]
    assert all(not r["messages"][0]["content"].startswith("Context:") for r in closed)

    rag = [r for r in rows if r["recipe"] == "raft"]
    prefix = RAG_PROMPT_TEMPLATE.split("{sources}")[0]
    cited = 0
    for row in rag:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert user.startswith(prefix) and "\n\nQuestion: " in user
        sources = sources_of(user)
        assert len(sources) == 3
        found = re.search(r" \[(\d)\][.!?]?$", answer)
        if found is None:  # the answering paragraph was left out: answered from memory
            continue
        cited += 1
        quoted = answer[: found.start()]
        gold = sources[int(found.group(1))]
        assert quoted.rstrip(".") in gold.replace("…", "")
        others = [text for n, text in sources.items() if n != int(found.group(1))]
        assert all(quoted.rstrip(".") not in text for text in others)
    # RAFT's P: most examples carry the answering paragraph, some only distractors
    assert 0.6 < cited / len(rag) < 0.95


def test_claims_answer_in_the_instructed_format(demo_docs: Path, tmp_path: Path) -> None:
    rows = run("claims", demo_docs, tmp_path / "claims")
    assert rows
    labels = Counter()
    for row in rows:
        system, user, assistant = (m["content"] for m in row["messages"])
        assert system == LABEL_INSTRUCTION
        label = assistant.split(".", 1)[0]
        assert label in ("Yes", "No", "Maybe")
        labels[label] += 1
        question = user.rsplit("Question: ", 1)[-1]
        claim = question.split("\n", 1)[0]
        sentence = re.sub(r" \[\d\](?=[.!]?$)", "", assistant.split(". ", 1)[1])
        if label == "No":
            assert claim_text(sentence) not in claim  # the claim was changed
        else:
            assert claim_text(sentence) in claim
    assert labels["Yes"] and labels["No"]
    assert any(r["messages"][1]["content"].startswith("Context:") for r in rows)  # RAG half
    assert any(not r["messages"][1]["content"].startswith("Context:") for r in rows)


def test_claim_labels_and_changes() -> None:
    assert falsify("Costs increased by 12 percent.") == "Costs decreased by 12 percent."
    assert falsify("The per diem is 45 euros.") == "The per diem is 93 euros."
    assert falsify("We saw 120 patients.") == "We saw 60 patients."
    assert falsify("Book at least 10 days ahead.") == "Book at least 23 days ahead."
    assert falsify("Plain sentence without either.") is None
    assert label_claim("This may reduce pain in adults.", "k")[0] == "maybe"
    assert label_claim("No significant difference was found.", "k")[0] == "maybe"
    assert claim_text("Patients improved.") == "patients improved"
    assert claim_text("MRI showed lesions.") == "MRI showed lesions"


def test_excerpt_keeps_the_quote_and_cite_places_the_marker() -> None:
    text = "First sentence here. " * 30 + "The answer is Keystone. " + "Tail. " * 30
    cut = excerpt(text, "The answer is Keystone.", limit=120)
    assert "The answer is Keystone." in cut and len(cut) <= 120
    assert cut.startswith("…") and cut.endswith("…")
    assert excerpt("short text", "x") == "short text"
    assert cite("Use Keystone.", 2) == "Use Keystone [2]."
    assert cite("No stop", 1) == "No stop [1]"


def test_raft_prompts_follow_the_servers_source_labels(demo_docs: Path, tmp_path: Path) -> None:
    """`ragtune prepare --source-labels` (PrepareOptions.source_labels): each source gets the
    title > heading line a server with retrieval.source_labels: true sends, above the same
    text; the examples are otherwise the same."""

    def rag_users(labels: bool, out: Path) -> list[str]:
        prepare(
            PrepareOptions(
                sources=[demo_docs],
                recipe="raft",
                out=out,
                val_ratio=0.0,
                test_ratio=0.0,
                source_labels=labels,
            )
        )
        rows = read_split(out, "train")
        return [r["messages"][0]["content"] for r in rows if r["recipe"] == "raft"]

    plain, labelled = rag_users(False, tmp_path / "plain"), rag_users(True, tmp_path / "labels")
    assert len(plain) == len(labelled) > 0 and plain != labelled
    unlabelled = [re.sub(r"^\[(\d+)\] [^\n]*\n", r"[\1] ", u, flags=re.M) for u in labelled]
    assert unlabelled == plain
    # every source of every prompt got its line (the demo documents all have titles)
    for with_labels, without in zip(labelled, plain, strict=True):
        sources = len(re.findall(r"^\[\d+\] ", without, flags=re.M))
        assert with_labels.count("\n") == without.count("\n") + sources
