"""`ragtune retrain --config configs/retrain/NAME.yaml`: one periodic retraining run
(training/retrain.py), meant for cron.

Exit codes: 0 done (promoted, the first version loaded, or nothing to do), 3 the gate
refused the candidate (the active version is untouched), 75 another run holds the lock
(nothing done), 1 a step failed and 2 bad input (the next run continues at that step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrain",
        help="Periodic retraining: changed documents + new feedback -> train -> gate -> "
        "promote (cron-safe).",
        description="Prepare the documents whose content changed since the last successful "
        "run and the new feedback, merge them into the previous data, train the next "
        "version, load it on the server and promote it through the gate (`ragtune adapters "
        "promote`). One run at a time (a lock under $RAGTUNE_HOME/retrain); a run that "
        "failed or was killed is continued at its first unfinished step. Exit 0 done or "
        "nothing to do, 3 refused by the gate, 75 locked by another run, 1 a step failed, "
        "2 bad input.",
    )
    parser.add_argument("--config", type=Path, required=True, help="configs/retrain/NAME.yaml")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="abandon an unfinished run of this adapter and start a new one",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="print the adapter's retraining state and unfinished run; change nothing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_retrain_command)


def run_retrain_command(args: argparse.Namespace) -> int:
    from ragtune.config import default_home
    from training.retrain import run_retrain, status
    from training.retrain_config import load_retrain_config
    from training.retrain_context import EXIT_LOCKED

    config = load_retrain_config(args.config)
    if args.status:
        print(json.dumps(status(config, default_home()), indent=2, ensure_ascii=False))
        return 0
    for noisy in ("httpx", "faiss.loader", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # stdout carries the report alone (JSON); what the steps print (the trainer's loss
    # lines, the gate's verdict) goes to stderr with the logs
    with contextlib.redirect_stdout(sys.stderr):
        code, report = run_retrain(config, restart=args.restart, progress=not args.no_progress)
    if code == EXIT_LOCKED:
        print(f"ragtune: {report['message']}", file=sys.stderr)
        return code
    print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    return code
