"""Agreement of two lm-evaluation-harness runs of one multiple-choice task, from their
`--log_samples` files: ragtune's `local-completions` against `hf` (or `hf` with `peft=`) on
the same fp32 model directory (issue #17). Questions are matched by `doc_id` and must have the
same prompt (`prompt_hash`) and choices; prints one JSON line:

    python bench/lm_eval_agreement.py OUT/ragtune OUT/hf [--task ragtune_pubmedqa]

`within_tol`: share of per-choice log-likelihoods within `--tol` nats (0.05) of each other;
`same_choice` / `same_choice_norm`: share of questions whose highest log-likelihood (acc) /
highest log-likelihood per character of the continuation (acc_norm's rule) picks the same
choice. `--check` exits 1 when `within_tol` < 0.99 or `same_choice` < 0.98 (issue #17).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

WITHIN_MIN = 0.99
SAME_CHOICE_MIN = 0.98


def samples_files(path: Path, task: str | None) -> list[Path]:
    """A samples file itself, or every `samples_<task>_*.jsonl` under an output folder (lm-eval
    nests them in a folder named after the model; runs over slices of the questions, made with
    `--samples`, can share one folder), oldest first."""
    if path.is_file():
        return [path]
    pattern = f"samples_{task}_*.jsonl" if task else "samples_*.jsonl"
    found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {pattern} under {path}; run lm_eval with --log_samples")
    return found


def read_samples(paths: list[Path]) -> dict[int, dict[str, Any]]:
    """Logged questions by `doc_id`; a later file's question replaces an earlier one's."""
    rows = {}
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    rows[int(row["doc_id"])] = row
    return rows


def loglikelihoods(row: dict[str, Any]) -> list[float]:
    """Per-choice sums, in choice order: `filtered_resps` holds `[loglikelihood, is_greedy]`
    per choice (strings in the log)."""
    return [float(resp[0]) for resp in row["filtered_resps"]]


def choices(row: dict[str, Any]) -> list[str]:
    """The continuations scored, target delimiter included (`arg_1` of each request)."""
    return [request["arg_1"] for request in row["arguments"].values()]


def first_argmax(values: list[float]) -> int:
    """numpy's argmax, as lm-eval picks: the first of equal maxima."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def agreement(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], tol: float) -> dict:
    shared = sorted(a.keys() & b.keys())
    if not shared:
        raise SystemExit("the two logs share no doc_id")
    diffs: list[float] = []
    same = same_norm = 0
    worst: tuple[float, int, str] = (0.0, -1, "")
    for doc in shared:
        row_a, row_b = a[doc], b[doc]
        if row_a.get("prompt_hash") != row_b.get("prompt_hash"):
            raise SystemExit(f"doc {doc}: the two runs scored different prompts")
        names = choices(row_a)
        if names != choices(row_b):
            raise SystemExit(f"doc {doc}: different choices {names} / {choices(row_b)}")
        ll_a, ll_b = loglikelihoods(row_a), loglikelihoods(row_b)
        for name, x, y in zip(names, ll_a, ll_b, strict=True):
            diffs.append(abs(x - y))
            if diffs[-1] > worst[0]:
                worst = (diffs[-1], doc, name)
        same += first_argmax(ll_a) == first_argmax(ll_b)
        lengths = [len(name) for name in names]
        same_norm += first_argmax([x / n for x, n in zip(ll_a, lengths, strict=True)]) == (
            first_argmax([y / n for y, n in zip(ll_b, lengths, strict=True)])
        )

    def mean(rows: dict[int, dict[str, Any]], metric: str) -> float:
        return sum(float(rows[d][metric]) for d in shared) / len(shared)

    return {
        "questions": len(shared),
        "unmatched": len(a.keys() ^ b.keys()),
        "choices": len(diffs),
        "tol_nats": tol,
        "within_tol": sum(d <= tol for d in diffs) / len(diffs),
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "worst": {"doc_id": worst[1], "choice": worst[2]},
        "same_choice": same / len(shared),
        "same_choice_norm": same_norm / len(shared),
        "acc": [mean(a, "acc"), mean(b, "acc")],
        "acc_norm": [mean(a, "acc_norm"), mean(b, "acc_norm")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path, help="samples file or lm_eval --output_path")
    parser.add_argument("second", type=Path, help="samples file or lm_eval --output_path")
    parser.add_argument("--task", default="ragtune_pubmedqa")
    parser.add_argument("--tol", type=float, default=0.05, help="nats")
    parser.add_argument("--check", action="store_true", help="exit 1 below the thresholds")
    args = parser.parse_args()
    files = [samples_files(path, args.task) for path in (args.first, args.second)]
    result = agreement(read_samples(files[0]), read_samples(files[1]), args.tol)
    print(json.dumps({"files": [len(f) for f in files], **result}), flush=True)
    if args.check and (
        result["within_tol"] < WITHIN_MIN or result["same_choice"] < SAME_CHOICE_MIN
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
