"""The `ragtune` command. Each area registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_models_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="Prepare or inspect the base model.")
    sub = parser.add_subparsers(dest="models_command", required=True)
    prepare = sub.add_parser(
        "prepare", help="Convert the configured model (default: bundled) into the cache."
    )
    prepare.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    prepare.add_argument(
        "--source",
        help="prepare this model instead of the configured model.source, e.g. "
        "bundled:gemma-3-270m (the multilingual model, converted only when asked)",
    )
    prepare.set_defaults(handler=_run_models_prepare)


def _run_models_prepare(args: argparse.Namespace) -> int:
    from ragtune.config import load_settings
    from ragtune.models import resolve_model_dir
    from ragtune.models.loader import model_fingerprint

    settings = load_settings(args.config)
    model_dir = resolve_model_dir(args.source or settings.model.source, settings.home)
    print(f"model: {model_dir}")
    print(f"fingerprint: {model_fingerprint(model_dir, settings.home)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from server.keys import add_keys_command
    from server.main import add_serve_command

    parser = argparse.ArgumentParser(
        prog="ragtune",
        description="Hybrid RAG + fine-tuned LoRA inference server for internal knowledge.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_command(subparsers)
    add_keys_command(subparsers)
    _add_models_command(subparsers)
    for register in _area_commands():
        register(subparsers)
    return parser


def _area_commands() -> list:
    """Subcommands owned by the data-path packages (`retrieval`, `training`, `evaluation`)."""
    import importlib

    registers = []
    for module_name in (
        "retrieval.cli",
        "training.cli",
        "evaluation.cli",
        "evaluation.adapters_cli",
        "training.retrain_cli",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing area package is optional; a missing dependency inside one is not.
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                raise
            continue
        registers.append(module.register)
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ragtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
