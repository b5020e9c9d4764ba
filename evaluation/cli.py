"""`ragtune bench`: base vs RAG vs fine-tuned vs fine-tuned + RAG on a QA set.

Registered by `ragtune.cli`; only argparse is imported at module level so `ragtune --help`
stays fast. Exit codes: 0 done, 1 the server or an arm failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """examples:
  ragtune bench --dataset qa.jsonl --index handbook --adapter handbook --out out/bench
  ragtune bench --dataset qa.jsonl --index handbook --build-index --arms base,rag --out out/b
  ragtune bench --url http://127.0.0.1:8000/v1 --dataset qa.jsonl --index handbook \\
      --adapter handbook --limit 50 --out out/bench
  ragtune bench --preset pubmedqa --limit 20 --out out/pubmedqa-20
  ragtune bench --preset demo --out out/demo
  ragtune bench --compare out/demo-a out/demo-b [--out out/compare]
See docs/benchmarks.md for the dataset format, the metrics and measured results."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` command to the `ragtune` parser."""
    parser = subparsers.add_parser(
        "bench",
        help="Benchmark base / rag / ft / ft+rag answers on a QA dataset.",
        description="Send every question through the server's OpenAI endpoint under each arm "
        "(greedy decoding), score the answers without an LLM judge, and write results.json, "
        "report.md and report.html to --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--preset", choices=("pubmedqa", "demo", "demo-ja"), help="end-to-end preset (no --dataset)"
    )
    what.add_argument("--dataset", type=Path, help="questions JSONL (bench format or PubMedQA)")
    what.add_argument("--arms", default="base,rag,ft,ft+rag", help="comma-separated subset")
    what.add_argument("--index", help="index for the rag arms (default: the server's default)")
    what.add_argument(
        "--adapter",
        help="ft arms: adapter NAME (loaded on --url, or $RAGTUNE_HOME/adapters/NAME latest), "
        "an adapter directory, or NAME=PATH; the preset trains one when omitted",
    )
    what.add_argument("--out", type=Path, help="output directory (required unless --compare)")
    what.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("RUN_A", "RUN_B"),
        help="put two earlier runs (their --out directories) side by side; runs nothing",
    )
    what.add_argument("--limit", type=int, help="only the first N questions")
    where = parser.add_argument_group("server")
    where.add_argument("--url", help="an OpenAI-compatible ragtune /v1 URL (default: start one)")
    where.add_argument("--api-key", help="client key (default: first of $RAGTUNE_API_KEYS)")
    where.add_argument("--config", help="YAML config for a started server and index builds")
    where.add_argument("--index-root", type=Path, help="index directory (default: configured)")
    where.add_argument(
        "--build-index",
        action="store_true",
        help="(re)build --index from the dataset's `context` fields first",
    )
    how = parser.add_argument_group("decoding and statistics")
    how.add_argument("--seed", type=int, default=0, help="request seed and bootstrap seed")
    how.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="default 64 (presets: pubmedqa 32, demo 48, demo-ja 64)",
    )
    how.add_argument("--top-k", type=int, default=3, help="sources per rag request")
    how.add_argument("--mode", choices=("dense", "bm25", "hybrid"), help="retrieval mode")
    how.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (default 8, preset 16)"
    )
    how.add_argument("--system-prompt", help="instruction sent as the system turn in every arm")
    how.add_argument("--resamples", type=int, default=2000, help="bootstrap/permutation draws")
    how.add_argument(
        "--no-likelihood",
        action="store_true",
        help="skip scoring the answer choices by log-likelihood (labelled / choices rows)",
    )
    how.add_argument(
        "--likelihood-from",
        choices=("auto", "echo", "generation"),
        default="auto",
        help="generation: read the choices from the generation request's own prompt and "
        "first-token logprobs (no second prefill; on ragtune's server the same numbers as an "
        "echo, as lm-eval's local-completions gets them); echo: score each prompt with a "
        "request of its own; auto (default): generation against the server the bench starts, "
        "echo against --url (another server's prompt rows may depend on the prompt's length)",
    )
    how.add_argument("--no-progress", action="store_true", help="no progress bars")
    preset = parser.add_argument_group("preset training")
    preset.add_argument("--train-steps", type=int, help="preset: cap on optimizer steps")
    preset.add_argument("--train-minutes", type=float, help="preset: wall-clock training budget")
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    if args.compare:
        if args.preset or args.dataset:
            raise ValueError("--compare reads two earlier runs; leave out --preset and --dataset")
        return
    if args.out is None:
        raise ValueError("give --out DIR")
    if args.preset and args.dataset:
        raise ValueError("give --preset or --dataset, not both")
    if not args.preset and not args.dataset:
        raise ValueError("give --dataset FILE (or --preset NAME, or --compare A B)")
    if args.preset and (args.url or args.build_index or args.index_root or args.index):
        raise ValueError(
            "--preset builds its own index and starts its own server; leave out "
            "--url, --index, --build-index and --index-root"
        )
    for name in ("limit", "max_tokens", "top_k", "concurrency", "resamples", "train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def run(args: argparse.Namespace) -> int:
    import openai

    from evaluation.bench import BenchOptions, run_bench
    from evaluation.presets import PresetOptions, run_preset

    _check(args)
    if args.compare:
        return _compare(args)
    for noisy in ("httpx", "httpx2", "faiss.loader", "bm25s"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    progress = not args.no_progress
    try:
        if args.preset:
            results = run_preset(
                PresetOptions(
                    out=args.out,
                    preset=args.preset,
                    limit=args.limit,
                    adapter=args.adapter,
                    train_steps=args.train_steps,
                    train_minutes=args.train_minutes,
                    seed=args.seed,
                    max_tokens=args.max_tokens,
                    top_k=args.top_k,
                    concurrency=args.concurrency or 16,
                    resamples=args.resamples,
                    progress=progress,
                    config=args.config,
                    arms=args.arms,
                    mode=args.mode,
                    system_prompt=args.system_prompt,
                    likelihood=not args.no_likelihood,
                    likelihood_from=args.likelihood_from,
                )
            )
        else:
            results = run_bench(
                BenchOptions(
                    dataset=args.dataset,
                    out=args.out,
                    arms=args.arms,
                    index=args.index,
                    adapter=args.adapter,
                    url=args.url,
                    api_key=args.api_key,
                    limit=args.limit,
                    seed=args.seed,
                    max_tokens=args.max_tokens or 64,
                    top_k=args.top_k,
                    mode=args.mode,
                    concurrency=args.concurrency or 8,
                    system_prompt=args.system_prompt,
                    index_root=args.index_root,
                    build_index=args.build_index,
                    config=args.config,
                    resamples=args.resamples,
                    progress=progress,
                    likelihood=not args.no_likelihood,
                    likelihood_from=args.likelihood_from,
                )
            )
    except (RuntimeError, openai.APIError) as exc:
        print(f"ragtune: error: {exc}", file=sys.stderr)
        return 1
    from evaluation.report_markdown import markdown_table, summary_table

    print("\n".join(markdown_table(summary_table(results))))
    print(f"wrote {args.out / 'report.html'}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from evaluation.compare import compare_markdown
    from ragtune.fileio import atomic_write_text

    text = compare_markdown(args.compare[0], args.compare[1], args.seed, args.resamples)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "compare.md", text)
        (args.out / "compare.md").chmod(0o644)
        print(f"wrote {args.out / 'compare.md'}", file=sys.stderr)
    return 0
