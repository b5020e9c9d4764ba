"""`ragtune retrain`: periodic retraining, safe to run from cron.

One run is prepare -> train -> load -> gate -> finish for one adapter:

- **prepare**: the documents whose content (sha256) changed since the last successful run,
  and new ones, are prepared again (`training.prepare`); their old examples, and those of
  removed documents, leave the dataset; new usable feedback (corrections, up-rated answers:
  `training.from_feedback`) is added, de-duplicated against the previous data. The merged
  dataset is split as `ragtune prepare` splits (by document / response id). Nothing changed
  (no document, no new usable feedback) -> the run ends before it starts, exit 0.
- **train**: `training.trainer.train` on the merged data as the next free version; a run
  interrupted mid-training continues from its last checkpoint.
- **load**: the version is loaded on the server (`POST /v1/load_lora_adapter`, not
  activated unless it is the adapter's first version there).
- **gate**: `ragtune adapters promote NAME@VERSION --gate QA` (evaluation/adapters_cli.py):
  both versions answer the questions, accepted -> activated, refused -> untouched.
- **finish**: the document hashes, feedback ids and dataset become the state the next run
  compares with.

A lock (`$RAGTUNE_HOME/retrain/.lock`, fcntl, non-blocking) keeps two runs from
overlapping: the second exits at once with EXIT_LOCKED. Each run keeps a directory
(`$RAGTUNE_HOME/retrain/NAME/runs/RUN/run.json`) recording the steps that finished and
their outputs; a run that failed or was killed is continued at its first unfinished step by
the next `ragtune retrain` of the same adapter. Every step is in the audit log
(`retrain_prepare`, `retrain_train`, `retrain_load`, `retrain_gate`, `retrain_finish`;
counts and names, never the text of a document or a conversation).
"""

import getpass
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.retrain_config import RetrainConfig
from training.retrain_context import (
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_REFUSED,
    STEPS,
    Context,
    RetrainLocked,
    Run,
    adapter_root,
    anything_changed,
    changes,
    now,
    read_json,
    retrain_lock,
    write_json,
)
from training.retrain_steps import STEP_FUNCTIONS

logger = logging.getLogger(__name__)


def _new_run(root: Path, config: RetrainConfig) -> Run:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_id, number = stamp, 1
    while (root / "runs" / run_id).exists():
        number += 1
        run_id = f"{stamp}-{number}"
    directory = root / "runs" / run_id
    directory.mkdir(parents=True)
    record = {
        "run_id": run_id,
        "adapter": config.adapter,
        "started_at": now(),
        "status": "running",
        "config": config.model_dump(mode="json"),
        "steps": {},
    }
    return Run(directory, record)


def _prune_runs(root: Path, state: dict[str, Any], keep: int) -> None:
    runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir())
    protected = {state.get("last_run"), state.get("current_run")}
    finished = [p for p in runs if read_json(p / "run.json").get("status") == "finished"]
    for old in finished[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def status(config: RetrainConfig, home: Path) -> dict[str, Any]:
    """The adapter's state and its unfinished run, if any (no lock needed: read only)."""
    root = adapter_root(home, config.adapter)
    state = read_json(root / "state.json")
    current = state.get("current_run")
    run = read_json(root / "runs" / current / "run.json") if current else {}
    return {
        "adapter": config.adapter,
        "state": {k: v for k, v in state.items() if k not in ("documents", "feedback_ids")},
        "documents_tracked": len(state.get("documents", {})),
        "feedback_ids_seen": len(state.get("feedback_ids", [])),
        "unfinished_run": current,
        "unfinished_steps": {
            name: step.get("status") for name, step in run.get("steps", {}).items()
        },
    }


def run_retrain(
    config: RetrainConfig,
    home: Path | None = None,
    *,
    restart: bool = False,
    progress: bool = True,
    train_fn: Callable[..., Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One run under the lock; returns (exit code, report). EXIT_LOCKED when another run
    holds the lock. A failed step leaves the run to be continued by the next call."""
    from ragtune.audit import AuditLog
    from ragtune.config import load_settings

    settings = load_settings()
    home = home or settings.home
    if train_fn is None:
        from training.trainer import train as train_fn
    try:
        with retrain_lock(home, config.adapter):
            return _run_locked(
                config,
                home,
                restart=restart,
                progress=progress,
                train_fn=train_fn,
                audit=AuditLog(settings.audit_path()),
                retention_days=settings.feedback.retention_days,
            )
    except RetrainLocked as exc:
        return EXIT_LOCKED, {"adapter": config.adapter, "status": "locked", "message": str(exc)}


def _run_locked(
    config: RetrainConfig,
    home: Path,
    *,
    restart: bool,
    progress: bool,
    train_fn: Callable[..., Any],
    audit: Any,
    retention_days: int,
) -> tuple[int, dict[str, Any]]:
    root = adapter_root(home, config.adapter)
    state_path = root / "state.json"
    state = read_json(state_path)
    current = state.get("current_run")
    run: Run | None = None
    if current and not restart and (root / "runs" / current / "run.json").is_file():
        run = Run(root / "runs" / current, read_json(root / "runs" / current / "run.json"))
        run.record["status"] = "running"
        logger.info("continuing run %s of %s", run.id, config.adapter)
    if run is None:
        found = changes(config, home, state, retention_days)
        if not anything_changed(found, state):
            message = f"nothing changed since run {state.get('last_run')}; nothing to do"
            logger.info("%s: %s", config.adapter, message)
            return EXIT_OK, {
                "adapter": config.adapter,
                "status": "nothing_to_do",
                "message": message,
            }
        run = _new_run(root, config)
        state["current_run"] = run.id
        run.save()
        write_json(state_path, state)
    ctx = Context(
        config=config,
        home=home,
        run=run,
        state=state,
        audit=audit,
        who=f"cli:{getpass.getuser()}",
        progress=progress,
        train_fn=train_fn,
        retention_days=retention_days,
    )
    for name in STEPS:
        if run.done(name):
            continue
        step = run.step(name)
        step.update({"status": "running", "started_at": now()})
        step.pop("error", None)
        run.save()
        try:
            outputs = STEP_FUNCTIONS[name](ctx)
        except Exception as exc:
            step.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
            run.record["status"] = "failed"
            run.save()
            ctx.record(f"retrain_{name}", "error", error=str(exc), resumable=True)
            logger.error("retrain %s: step %s failed: %s", run.id, name, exc)
            code = EXIT_BAD_INPUT if isinstance(exc, (ValueError, FileNotFoundError)) else 1
            return code, _report(run, f"failed at {name}: {exc} (the next run continues here)")
        step.update({"status": "done", "finished_at": now(), "outputs": outputs})
        if name == "finish":
            run.record.update({"status": "finished", "finished_at": now()})
        run.save()
    _prune_runs(root, state, config.keep_runs)
    decision = run.outputs("finish").get("decision")
    return (EXIT_REFUSED if decision == "refused" else EXIT_OK), _report(run, decision)


def _report(run: Run, outcome: str | None) -> dict[str, Any]:
    """What the run did, without the bulky hash lists."""
    steps = {}
    for name, step in run.record["steps"].items():
        outputs = {
            k: v
            for k, v in step.get("outputs", {}).items()
            if k not in ("document_hashes", "feedback_ids")
        }
        steps[name] = {"status": step.get("status"), **outputs}
        if step.get("error"):
            steps[name]["error"] = step["error"]
    return {
        "run": run.id,
        "adapter": run.record["adapter"],
        "directory": str(run.directory),
        "outcome": outcome,
        "steps": steps,
    }
