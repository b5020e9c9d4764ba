"""The report's verdict (winners with paired intervals, costs, the reading stated only where
an interval excludes zero) and `ragtune bench --compare`, from hand-made rows."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.dataset import QAItem
from evaluation.report import build_results, write_reports
from evaluation.scoring import summarise
from evaluation.verdict import costs, reading, verdict_markdown, winners

N = 30
ITEMS = [
    QAItem(
        f"q{i}",
        f"Which app is used for task {i}?",
        (f"The Keystone app {i}.",),
        keywords=("keystone",),
    )
    for i in range(N)
]
ARMS = {"base": False, "rag": True, "ft": False, "ft+rag": True}


def rows_for(answers: dict[str, list[str]]) -> dict[str, list[dict]]:
    out = {}
    for arm, texts in answers.items():
        out[arm] = [
            {
                "id": item.id,
                "arm": arm,
                "model": "ad" if arm.startswith("ft") else "m",
                "rag": ARMS[arm],
                "answer": text,
                "error": None,
                "latency_s": 2.0 if ARMS[arm] else 1.0,
                "finish_reason": "stop",
                "prompt_tokens": 400 if ARMS[arm] else 40,
                "completion_tokens": 5,
                "sources": [],
            }
            for item, text in zip(ITEMS, texts, strict=True)
        ]
    return out


def results_for(answers: dict[str, list[str]], training: dict | None = None) -> dict:
    rows = rows_for(answers)
    summary = summarise(ITEMS, rows, labels=(), top_k=3, seed=0, resamples=300)
    run = {
        "dataset": "demo.jsonl",
        "dataset_name": "toy",
        "questions": N,
        "seed": 0,
        "resamples": 300,
        "settings": {
            "temperature": 0.0,
            "max_tokens": 8,
            "top_k": 3,
            "index": "i",
            "concurrency": 1,
        },
        "arms": {arm: {"model": rows[arm][0]["model"], "rag": ARMS[arm]} for arm in answers},
        "server": "test",
        "duration_s": 1.0,
        "training": training,
    }
    return build_results(run, summary, rows, ITEMS)


def right(i: int) -> str:
    return f"Use the Keystone app {i}."


WRONG = "I do not know."


def test_clear_winner_and_the_reading_it_supports() -> None:
    results = results_for(
        {
            "base": [WRONG] * N,
            "rag": [right(i) for i in range(N)],
            "ft": [right(i) if i % 3 == 0 else WRONG for i in range(N)],
            "ft+rag": [right(i) for i in range(N)],
        },
        training={"train_s": 300.0, "peak_rss_bytes": 2 * 2**30},
    )
    found = {w["metric"]: w for w in winners(results)}
    assert found["keyword_hit"]["best"] in ("rag", "ft+rag")
    assert not found["keyword_hit"]["clear"]  # rag and ft+rag tie: no winner between them
    lines = reading(results)
    assert any(line.startswith("Retrieval brings the documents' knowledge in") for line in lines)
    ft_line = next(line for line in lines if line.startswith("Fine-tuning put some"))
    assert "less than retrieval on " in ft_line and "(rag − ft " in ft_line
    assert ft_line.count("; on ") >= 1  # every metric where ft is clearly ahead is named
    assert not any("Both together" in line for line in lines)  # ft+rag does not beat rag
    by_arm = {c["arm"]: c for c in costs(results)}
    assert by_arm["ft"]["train_min"] == 5.0 and by_arm["ft"]["train_peak_gb"] == 2.0
    assert by_arm["rag"]["added_latency_s"] == 1.0
    assert by_arm["rag"]["added_prompt_tokens_mean"] == 360.0
    assert "## Verdict" in "\n".join(verdict_markdown(results))


def test_no_reading_where_every_interval_includes_zero() -> None:
    noisy = [right(i) if i % 2 else WRONG for i in range(N)]
    shifted = [right(i) if i % 2 == 0 or i == 1 else WRONG for i in range(N)]
    results = results_for({"base": noisy, "rag": shifted})
    assert reading(results) == [
        "No paired difference is clear where the reading would need one: these numbers "
        "do not tell RAG and fine-tuning apart on this data."
    ]
    assert not any(w["clear"] for w in winners(results))
    text = "\n".join(verdict_markdown(results))
    assert "no clear winner" in text and "** wins" not in text


def test_compare_puts_two_runs_side_by_side(tmp_path: Path, capsys) -> None:
    from evaluation.cli import register

    first = results_for({"base": [WRONG] * N, "rag": [right(i) for i in range(N)]})
    second = results_for(
        {"base": [right(i) for i in range(N)], "rag": [right(i) for i in range(N)]}
    )
    write_reports(tmp_path / "a", first)
    write_reports(tmp_path / "b", second)
    parser = argparse.ArgumentParser(prog="ragtune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "bench",
            "--compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "c" / "compare.md").read_text(encoding="utf-8")
    base_kw = next(line for line in text.splitlines() if line.startswith("| base | keyword hit"))
    assert "+1.000 [+1.000, +1.000] *" in base_kw and base_kw.endswith(f"| {N} |")
    rag_kw = next(line for line in text.splitlines() if line.startswith("| rag | keyword hit"))
    assert "+0.000" in rag_kw and "*" not in rag_kw
