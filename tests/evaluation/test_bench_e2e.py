"""`ragtune bench` end to end against the real test server: index built from the dataset's
contexts, all four arms (the ft arms use the preloaded random LoRA `alpha`)."""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import API_KEY, BASE_MODEL

QUESTIONS = [
    {
        "id": "vpn",
        "question": "Does the VPN certificate expire every 90 days?",
        "answers": ["Yes, the VPN certificate expires every 90 days."],
        "label": "yes",
        "gold_doc_ids": ["doc-vpn"],
        "context": "The VPN certificate expires every 90 days. Renew it in the Keystone portal.",
    },
    {
        "id": "leave",
        "question": "Can unused leave be carried over to the next year?",
        "answers": ["No, unused leave expires on 31 March."],
        "label": "no",
        "gold_doc_ids": ["doc-leave"],
        "context": "Unused annual leave cannot be carried over; it expires on 31 March.",
    },
    {
        "id": "dock",
        "question": "Is forklift training required for the loading dock?",
        "answers": ["Yes, forklift training is required."],
        "label": "yes",
        "gold_doc_ids": ["doc-dock"],
        "context": "Everyone working at the loading dock needs forklift training first.",
    },
]


def bench_parser() -> argparse.ArgumentParser:
    from evaluation.cli import register

    parser = argparse.ArgumentParser(prog="ragtune")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_bench_all_arms_against_the_real_server(server, index_root: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "qa.jsonl"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    out = tmp_path / "bench"
    args = bench_parser().parse_args(
        [
            "bench",
            "--url", server.v1,
            "--api-key", API_KEY,
            "--dataset", str(dataset),
            "--index", "bench-e2e",
            "--build-index",
            "--index-root", str(index_root),
            "--adapter", "alpha",
            "--arms", "base,rag,ft,ft+rag",
            "--limit", "2",
            "--max-tokens", "12",
            "--top-k", "2",
            "--resamples", "200",
            "--no-progress",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert args.handler(args) == 0

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["arms"]) == ["base", "rag", "ft", "ft+rag"]
    assert results["run"]["questions"] == 2
    assert results["run"]["index"]["documents"] == 3  # every context, not only the limit
    for name, arm in results["arms"].items():
        assert arm["model"] == ("alpha" if name.startswith("ft") else BASE_MODEL)
        assert arm["rag"] == name.endswith("rag")
        assert arm["errors"] == 0
        assert [row["id"] for row in arm["rows"]] == ["vpn", "leave"]
        for row in arm["rows"]:
            assert row["answer"].strip()
            assert 1 <= row["completion_tokens"] <= 12
            assert row["latency_s"] > 0
            assert row["predicted_label"] in ("yes", "no", "maybe", None)
            # likelihood: every choice scored after the arm's own prompt, rebuilt exactly
            assert row["likelihood_error"] is None
            assert row["choices"] == ["Yes", "No"]  # the dataset's labels, capitalised
            assert row["likelihood_choice"] in row["choices"]
            # each choice exactly, or (read from the generation request, outside its top
            # alternatives) as a bound that cannot win
            for ll, bound in zip(row["loglikelihoods"], row["loglikelihood_bounds"], strict=True):
                assert (ll is None) != (bound is None) and (ll if bound is None else bound) < 0
            assert row["likelihood_source"] in ("generation", "generation+echo", "echo")
            assert row["likelihood_prompt_matches"] is True
            if arm["rag"]:
                assert 1 <= len(row["sources"]) <= 2
                assert row["sources"][0]["source"].startswith("doc-")
                assert row["recall_at_k"] in (0.0, 1.0)
            else:
                assert row["sources"] == [] and row["recall_at_k"] is None
        metrics = arm["metrics"]
        assert metrics["label_accuracy"]["n"] == 2
        assert metrics["likelihood_accuracy"]["n"] == metrics["likelihood_acc_norm"]["n"] == 2
        assert 0.0 <= metrics["token_f1"]["low"] <= metrics["token_f1"]["high"] <= 1.0
        assert (metrics["recall_at_k"]["n"] == 2) == arm["rag"]
        assert arm["latency_s"]["p50"] <= arm["latency_s"]["p95"]
    # hybrid retrieval finds these one-sentence documents by their own words
    assert results["arms"]["rag"]["metrics"]["recall_at_k"]["mean"] == 1.0
    assert len(results["comparisons"]) >= 6  # every pair on label accuracy alone

    facts = results["run"]["likelihood"]["arms"]
    assert all(f["errors"] == 0 and f["prompt_mismatches"] == 0 for f in facts.values())
    # the same prompts as lm-evaluation-harness tasks; results.json keeps no prompt text
    assert results["run"]["likelihood"]["lm_eval"] == [
        "ragtune_base",
        "ragtune_rag",
        "ragtune_ft",
        "ragtune_ft_rag",
    ]
    task = (out / "lm_eval" / "ragtune_ft_rag.yaml").read_text(encoding="utf-8")
    assert "output_type: multiple_choice" in task and "ft_rag.jsonl" in task
    docs = [json.loads(line) for line in (out / "lm_eval" / "ft_rag.jsonl").open()]
    assert [d["id"] for d in docs] == ["vpn", "leave"] and docs[0]["gold"] == 0
    assert docs[0]["context"].endswith("<|im_start|>assistant\n")
    assert all(
        "likelihood_context" not in row for a in results["arms"].values() for row in a["rows"]
    )

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Benchmark: qa")
    assert "## Verdict" in markdown
    for arm in ("base", "rag", "ft", "ft+rag"):
        assert re.search(rf"^\| {re.escape(arm)} \| ", markdown, flags=re.M)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.rstrip().endswith("</html>")
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) >= 3
    for svg in svgs:
        ET.fromstring(svg)
    assert html.count("<circle") == 8  # 2 questions x 4 arms, one dot per request
