"""`ragtune prepare`, `ragtune train` and `ragtune estimate-memory`.

Registered by `ragtune.cli`; every heavy import happens inside a handler so `ragtune --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.recipes import RECIPES  # light: recipe modules, no torch

if TYPE_CHECKING:
    from training.config import TrainConfig

METHODS = ("lora", "qlora", "sparse")


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_estimate(subparsers)


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="Turn documents into PII-masked, de-duplicated train/val/test chat JSONL.",
        description="Documents (or, with --from-feedback, rated chat completions) -> "
        "train.jsonl, val.jsonl, test.jsonl and stats.json in --out.",
    )
    parser.add_argument(
        "--source",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="files or directories (repeatable); required without --from-feedback",
    )
    parser.add_argument("--recipe", choices=RECIPES, help="required with --source")
    parser.add_argument(
        "--from-feedback",
        nargs="?",
        const="",
        metavar="DIR",
        help="instead of documents: corrections and up-rated answers of the conversations "
        "the server kept (feedback.store_conversations) in DIR (default $RAGTUNE_HOME/feedback)",
    )
    parser.add_argument(
        "--against",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="with --from-feedback: a prepared dataset whose examples are not repeated "
        "(repeatable)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
    parser.add_argument(
        "--qa-generator",
        choices=("template", "model"),
        default="template",
        help="qa/code: deterministic templates, or a local model",
    )
    parser.add_argument(
        "--generator-model",
        default="bundled",
        help="model for --qa-generator model: 'bundled' or a local model dir",
    )
    parser.add_argument("--questions-per-unit", type=int, default=3)
    parser.add_argument(
        "--source-labels",
        action="store_true",
        help="raft: put each source's title > heading line above its text, for a server "
        "run with retrieval.source_labels: true",
    )
    parser.add_argument("--val-ratio", type=float, default=0.1)
    parser.add_argument("--test-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument(
        "--near-duplicate-threshold",
        type=float,
        default=0.8,
        help="MinHash Jaccard threshold; 0 disables near-duplicate removal",
    )
    parser.add_argument(
        "--no-pii-masking", action="store_true", help="keep PII (only for data already scrubbed)"
    )
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ragtune.config import default_home
    from training.prepare import PrepareOptions, prepare

    if args.from_feedback is not None:
        return run_prepare_from_feedback(args)
    if not args.source or not args.recipe:
        raise ValueError("ragtune prepare needs --source and --recipe (or --from-feedback)")
    stats = prepare(
        PrepareOptions(
            sources=[Path(source) for source in args.source],
            recipe=args.recipe,
            out=args.out,
            qa_generator=args.qa_generator,
            generator_model=args.generator_model,
            home=default_home(),
            val_ratio=args.val_ratio,
            test_ratio=args.test_ratio,
            seed=args.seed,
            near_duplicate_threshold=args.near_duplicate_threshold or None,
            mask_pii=not args.no_pii_masking,
            questions_per_unit=args.questions_per_unit,
            source_labels=args.source_labels,
        )
    )
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_prepare_from_feedback(args: argparse.Namespace) -> int:
    """Feedback -> dataset; audited as counts (never the text) like other data changes."""
    import getpass

    from ragtune.audit import AuditLog
    from ragtune.config import load_settings
    from ragtune.feedback_store import feedback_dir
    from training.from_feedback import FeedbackOptions, prepare_from_feedback

    settings = load_settings()
    source = Path(args.from_feedback) if args.from_feedback else feedback_dir(settings.home)
    audit = AuditLog(settings.audit_path())
    who = f"cli:{getpass.getuser()}"
    fields = {"source": str(source), "out": str(args.out)}
    try:
        stats = prepare_from_feedback(
            FeedbackOptions(
                feedback_dir=source,
                out=args.out,
                against=args.against,
                retention_days=settings.feedback.retention_days,
                val_ratio=args.val_ratio,
                test_ratio=args.test_ratio,
                seed=args.seed,
                near_duplicate_threshold=args.near_duplicate_threshold or None,
            )
        )
    except Exception as exc:
        audit.record(who, "prepare_from_feedback", "error", error=str(exc), **fields)
        raise
    audit.record(
        who,
        "prepare_from_feedback",
        "ok",
        **fields,
        feedback=stats["feedback"],
        examples=stats["examples"],
        data_hash=stats["data_hash"],
    )
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune an adapter (LoRA, QLoRA or sparse) on prepared data.",
        description="Train an adapter; flags override the --config file. Runs under torchrun "
        "for multi-process (DDP) training.",
    )
    parser.add_argument("--config", type=Path, help="configs/train/NAME.yaml")
    parser.add_argument("--data", type=Path, help="directory written by `ragtune prepare`")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument(
        "--output",
        type=Path,
        help="adapter directory (default $RAGTUNE_HOME/adapters/NAME/VERSION)",
    )
    parser.add_argument("--name", help="adapter name")
    parser.add_argument("--version", help="adapter version (default: next vN)")
    parser.add_argument("--base-model", help="'bundled' or a local model directory")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--rank",
        type=_or_auto(int),
        metavar="R|auto",
        help="adapter.r; 'auto' sweeps search.ranks on the validation split and keeps the "
        "fewest parameters within 5%% of the best validation-loss reduction",
    )
    parser.add_argument(
        "--density",
        type=_or_auto(float),
        metavar="D|auto",
        help="sparse only: trained fraction of the target weights in (0, 1] (replaces r); "
        "'auto' sweeps search.densities",
    )
    parser.add_argument(
        "--sparse-selection",
        choices=("random", "gradient", "magnitude"),
        help="sparse only: which entries train: PEFT's seeded random mask, the largest "
        "accumulated |grad| on a calibration pass over the training data, or the largest |W|",
    )
    parser.add_argument(
        "--calibration-batches", type=int, help="batches of the gradient calibration pass"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="wall-time budget of the --rank auto / --density auto sweep",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint of this run, or a given one",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --config file (if any) with the flags that were given laid over it."""
    from training.config import load_train_config

    overrides = {
        "data": args.data,
        "method": args.method,
        "max_steps": args.max_steps,
        "output": args.output,
        "name": args.name,
        "version": args.version,
        "base_model": args.base_model,
        "seed": args.seed,
        "adapter.r": args.rank,
        "adapter.density": args.density,
        "adapter.selection": args.sparse_selection,
        "adapter.calibration_batches": args.calibration_batches,
        "search.budget_minutes": args.budget_minutes,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.rank is not None and args.density is not None:
        raise ValueError("--rank and --density set the same budget: give one of them")
    if args.rank is not None:
        given["adapter.density"] = None  # the flag's rank replaces a density from the file
    config = load_train_config(args.config, given)
    if args.no_progress:
        config.progress = False
    return config


def _or_auto(kind: type) -> Any:
    """argparse type: a number of `kind`, or the word 'auto'."""

    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} or 'auto', got {text!r}"
            ) from None

    parse.__name__ = f"{kind.__name__} or 'auto'"
    return parse


def run_train(args: argparse.Namespace) -> int:
    from training.trainer import train

    result = train(config_from_args(args), resume=args.resume)
    if result.is_main_process:
        print(json.dumps({"adapter": str(result.adapter_dir), **result.metrics}, indent=2))
    return 0


def _add_estimate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate-memory",
        help="Estimate training memory: weights, gradients, optimizer state, activations.",
    )
    parser.add_argument("--params", help="model size, e.g. 135M, 7B (or use --model)")
    parser.add_argument("--model", help="'bundled' or a model dir: read the shape from config")
    parser.add_argument("--method", choices=("lora", "qlora", "full"), default="lora")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="weight/compute dtype (CPU training here uses fp32)",
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where training runs (sets the runtime overhead)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    from training.memory import estimate, format_estimate, shape_for

    if not args.params and not args.model:
        raise ValueError("give --params (e.g. 7B) or --model")
    shape = shape_for(params=args.params, model=args.model)
    result = estimate(
        shape,
        method=args.method,
        seq_len=args.seq_len,
        batch=args.batch,
        dtype=args.dtype,
        lora_rank=args.lora_rank,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_estimate(result))
    return 0
