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

from __future__ import annotations

import contextlib
import fcntl
import gc
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.fileio import atomic_write_text
from training.dataset import SPLIT_FILES, read_split, write_split_dataset
from training.dedupe import remove_exact
from training.records import Example
from training.retrain_config import RetrainConfig

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3  # as `ragtune adapters promote`
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock; try again later

STEPS = ("prepare", "train", "load", "gate", "finish")
_VERSION = re.compile(r"^\.?v(\d+)(\.checkpoints)?$")


class RetrainLocked(RuntimeError):
    """Another `ragtune retrain` holds the lock."""


def retrain_root(home: Path) -> Path:
    return home / "retrain"


def adapter_root(home: Path, adapter: str) -> Path:
    return retrain_root(home) / adapter


@contextlib.contextmanager
def retrain_lock(home: Path, adapter: str) -> Iterator[Path]:
    """Hold `$RAGTUNE_HOME/retrain/.lock` (one run at a time per home: training takes the
    machine); RetrainLocked naming the holder when another process has it. The kernel drops
    the lock when its process dies, so a killed run never blocks the next one."""
    path = retrain_root(home) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RetrainLocked(
                f"another ragtune retrain run holds {path} ({holder}); this run does nothing"
            ) from None
        holder = {"pid": os.getpid(), "adapter": adapter, "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield path
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- run state
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@dataclass
class Run:
    """One run's directory and record (`run.json`, rewritten atomically after each step)."""

    directory: Path
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return self.record["run_id"]

    def save(self) -> None:
        _write_json(self.directory / "run.json", self.record)

    def step(self, name: str) -> dict[str, Any]:
        return self.record["steps"].setdefault(name, {})

    def done(self, name: str) -> bool:
        return self.record["steps"].get(name, {}).get("status") == "done"

    def outputs(self, name: str) -> dict[str, Any]:
        return self.record["steps"].get(name, {}).get("outputs", {})


@dataclass
class Context:
    config: RetrainConfig
    home: Path
    run: Run
    state: dict[str, Any]
    audit: Any
    who: str
    progress: bool
    train_fn: Callable[..., Any]
    retention_days: int
    admin_key: str | None = None

    @property
    def name(self) -> str:
        return self.config.adapter

    def key(self) -> str:
        if self.admin_key is None:
            env = self.config.server.admin_key_env
            keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
            if not keys:
                raise ValueError(f"no admin key: set {env} (server.admin_key_env)")
            self.admin_key = keys[0]
        return self.admin_key

    def server(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        from evaluation.adapters_cli import admin_call

        url = self.config.server.url.rstrip("/") + path
        return admin_call(method, url, self.key(), body, timeout=self.config.server.timeout_s)

    def listed(self) -> dict[str, Any] | None:
        """The adapter's entry in the server's `GET /v1/adapters`, None if not loaded."""
        return next(
            (a for a in self.server("GET", "/adapters")["data"] if a["name"] == self.name), None
        )

    def record(self, action: str, result: str, **fields: Any) -> None:
        self.audit.record(self.who, action, result, adapter=self.name, run=self.run.id, **fields)


# ------------------------------------------------------------------------------ the scan
def document_hashes(config: RetrainConfig) -> dict[str, str]:
    """doc id -> sha256 of its text, for the files `ragtune prepare` would read."""
    from training.documents import load_documents
    from training.recipes import get_recipe

    if not config.documents.sources:
        return {}
    suffixes = get_recipe(config.documents.recipe).suffixes
    documents = load_documents(config.documents.sources, suffixes)
    return {doc.id: hashlib.sha256(doc.text.encode("utf-8")).hexdigest() for doc in documents}


def feedback_source(config: RetrainConfig, home: Path) -> Path:
    from ragtune.feedback_store import feedback_dir

    return config.feedback.dir or feedback_dir(home)


def feedback_ids(config: RetrainConfig, home: Path, retention_days: int) -> list[str]:
    """Response ids of the usable feedback (corrections, up-rated answers) kept now."""
    from ragtune.feedback_store import FeedbackStore
    from training.from_feedback import feedback_examples

    source = feedback_source(config, home)
    if not config.feedback.enabled or not source.is_dir():
        return []
    examples = feedback_examples(FeedbackStore(source, retention_days), Counter())
    return sorted(example.doc_id for example in examples)


def changes(config: RetrainConfig, home: Path, state: dict[str, Any], retention: int) -> dict:
    """What differs from the last successful run: documents new, changed and removed, and
    usable feedback not seen then."""
    hashes = document_hashes(config)
    before: dict[str, str] = state.get("documents", {})
    seen = set(state.get("feedback_ids", []))
    ids = feedback_ids(config, home, retention)
    return {
        "hashes": hashes,
        "feedback_ids": ids,
        "new": sorted(set(hashes) - set(before)),
        "changed": sorted(d for d in hashes if d in before and before[d] != hashes[d]),
        "removed": sorted(set(before) - set(hashes)),
        "unchanged": sum(1 for d in hashes if before.get(d) == hashes[d]),
        "new_feedback": [i for i in ids if i not in seen],
    }


def anything_changed(found: dict[str, Any], state: dict[str, Any]) -> bool:
    if not state.get("data"):
        return bool(found["hashes"] or found["new_feedback"])
    return bool(found["new"] or found["changed"] or found["removed"] or found["new_feedback"])


# ----------------------------------------------------------------------------- the steps
def _rows(directory: Path | None) -> list[dict[str, Any]]:
    if directory is None or not directory.is_dir():
        return []
    return [row for split in SPLIT_FILES for row in read_split(directory, split)]


def _prepare_documents(ctx: Context, doc_ids: list[str], out: Path) -> list[dict[str, Any]]:
    """`ragtune prepare` over just these documents, under their usual ids (a scratch tree of
    links at the ids' relative paths)."""
    from training.documents import load_documents
    from training.prepare import PrepareOptions, prepare
    from training.recipes import get_recipe

    settings = ctx.config.documents
    wanted = set(doc_ids)
    documents = load_documents(settings.sources, get_recipe(settings.recipe).suffixes)
    with tempfile.TemporaryDirectory(prefix="ragtune-retrain-") as scratch:
        for document in documents:
            if document.id in wanted:
                link = Path(scratch) / document.id
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(document.path.resolve())
        prepare(
            PrepareOptions(
                sources=[Path(scratch)],
                recipe=settings.recipe,
                out=out,
                qa_generator=settings.qa_generator,
                generator_model=settings.generator_model,
                home=ctx.home,
                val_ratio=0.0,
                test_ratio=0.0,  # the merged dataset is split below
                seed=ctx.config.split.seed,
                near_duplicate_threshold=ctx.config.split.near_duplicate_threshold,
                mask_pii=settings.mask_pii,
                questions_per_unit=settings.questions_per_unit,
                extra_stats={"retrain_documents": sorted(wanted)},
            )
        )
    return _rows(out)


def _prepare_feedback(ctx: Context, against: list[Path], out: Path) -> tuple[list, dict]:
    from training.from_feedback import FeedbackOptions, prepare_from_feedback

    split = ctx.config.split
    try:
        stats = prepare_from_feedback(
            FeedbackOptions(
                feedback_dir=feedback_source(ctx.config, ctx.home),
                out=out,
                against=[path for path in against if path.is_dir()],
                retention_days=ctx.retention_days,
                val_ratio=0.0,
                test_ratio=0.0,
                seed=split.seed,
                near_duplicate_threshold=split.near_duplicate_threshold,
            )
        )
    except ValueError as exc:
        if not str(exc).startswith("no training examples"):
            raise
        return [], {"examples": 0, "note": "every usable example is already in the data"}
    counts = {
        "examples": sum(stats["examples"].values()),
        "feedback": stats["feedback"],
        "removed_existing_duplicates": stats["examples_removed_existing_duplicates"],
        "removed_near_duplicates": stats["examples_removed_near_duplicates"],
    }
    return _rows(out), counts


def step_prepare(ctx: Context) -> dict[str, Any]:
    found = changes(ctx.config, ctx.home, ctx.state, ctx.retention_days)
    previous = Path(ctx.state["data"]) if ctx.state.get("data") else None
    gone = set(found["changed"]) | set(found["removed"])
    kept = [row for row in _rows(previous) if row["doc_id"] not in gone]
    to_prepare = found["new"] + found["changed"] if previous else sorted(found["hashes"])
    directory = ctx.run.directory
    fresh = _prepare_documents(ctx, to_prepare, directory / "documents") if to_prepare else []
    feedback_rows: list[dict[str, Any]] = []
    feedback_counts: dict[str, Any] = {"new_responses": len(found["new_feedback"])}
    if found["new_feedback"]:
        against = [p for p in (previous, directory / "documents") if p is not None]
        feedback_rows, counts = _prepare_feedback(ctx, against, directory / "feedback")
        feedback_counts.update(counts)
    examples = [
        Example(doc_id=row["doc_id"], recipe=row.get("recipe", ""), messages=row["messages"])
        for row in [*kept, *fresh, *feedback_rows]
    ]
    examples, duplicates = remove_exact(examples, key=lambda example: example.text)
    if not examples:
        raise ValueError("no training examples: no documents prepared and no usable feedback")
    split = ctx.config.split
    summary = write_split_dataset(
        directory / "data",
        examples,
        val_ratio=split.val_ratio,
        test_ratio=split.test_ratio,
        seed=split.seed,
        summarize=lambda by_split, assignment: {
            "recipe": "retrain",
            "adapter": ctx.name,
            "run": ctx.run.id,
            "previous_data": str(previous) if previous else None,
            "examples_kept_from_previous": len(kept),
            "examples_from_documents": len(fresh),
            "examples_from_feedback": len(feedback_rows),
            "examples_removed_exact_duplicates": duplicates,
        },
    )
    outputs = {
        "data": str(directory / "data"),
        "data_hash": summary["data_hash"],
        "examples": summary["examples"],
        "unchanged_data": summary["data_hash"] == ctx.state.get("data_hash"),
        "documents": {
            "new": found["new"],
            "changed": found["changed"],
            "removed": found["removed"],
            "unchanged": found["unchanged"],
            "examples_prepared": len(fresh),
            "examples_kept": len(kept),
        },
        "feedback": {**feedback_counts, "examples_added": len(feedback_rows)},
        "document_hashes": found["hashes"],
        "feedback_ids": found["feedback_ids"],
    }
    audited = {k: v for k, v in outputs.items() if k not in ("document_hashes", "feedback_ids")}
    ctx.record("retrain_prepare", "ok", **audited)
    return outputs


def _next_version(ctx: Context) -> str:
    """The next vN free on disk (finished or interrupted versions) and on the server."""
    numbers = [0]
    root = ctx.home / "adapters" / ctx.name
    if root.is_dir():
        numbers += [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    with contextlib.suppress(Exception):  # the server may be down now; load checks again
        listed = ctx.listed()
        for version in (listed or {}).get("versions", []):
            if m := _VERSION.match(version["version"]):
                numbers.append(int(m.group(1)))
    return f"v{max(numbers) + 1}"


def step_train(ctx: Context) -> dict[str, Any]:
    from ragtune.manifest import MANIFEST_NAME
    from training.config import load_train_config
    from training.trainer import checkpoint_dir_for

    if ctx.run.outputs("prepare").get("unchanged_data"):
        return {"skipped": "the merged data equals the last run's"}
    step = ctx.run.step("train")
    if "version" not in step:  # chosen once, so a resumed run finds its checkpoints
        step["version"] = _next_version(ctx)
        ctx.run.save()
    version = step["version"]
    config = load_train_config(
        ctx.config.train.config,
        {
            **ctx.config.train.overrides,
            "name": ctx.name,
            "version": version,
            "data": Path(ctx.run.outputs("prepare")["data"]),
        },
    )
    if not ctx.progress:
        config.progress = False
    adapter_dir = ctx.home / "adapters" / ctx.name / version
    resumed_from = None
    if (adapter_dir / MANIFEST_NAME).is_file():  # trained before a crash left run.json behind
        metrics = _read_json(adapter_dir / MANIFEST_NAME).get("metrics", {})
    else:
        checkpoints = checkpoint_dir_for(adapter_dir)
        resume = "latest" if any(checkpoints.glob("checkpoint-*")) else None
        result = ctx.train_fn(config, resume=resume, home=ctx.home)
        adapter_dir, metrics = Path(result.adapter_dir), result.metrics
        resumed_from = metrics.get("resumed_from")
        del result
        gc.collect()
    outputs = {
        "version": version,
        "adapter_dir": str(adapter_dir),
        "resumed_from": resumed_from,
        **{
            key: metrics.get(key)
            for key in ("train_loss", "eval_loss", "global_step", "duration_s")
        },
    }
    ctx.record("retrain_train", "ok", **outputs)
    return outputs


def step_load(ctx: Context) -> dict[str, Any]:
    trained = ctx.run.outputs("train")
    if "version" not in trained:
        return {"skipped": "nothing trained"}
    version = trained["version"]
    listed = ctx.listed()
    loaded = {v["version"] for v in (listed or {}).get("versions", [])}
    first = listed is None
    if version not in loaded:
        body = {
            "lora_name": ctx.name,
            "lora_path": trained["adapter_dir"],
            "version": version,
            "activate": first,
        }
        ctx.server("POST", "/load_lora_adapter", body)
    outputs = {
        "version": version,
        "first_version": first,
        "active_before": None if first else listed["active_version"],
    }
    ctx.record("retrain_load", "ok", **outputs)
    return outputs


def step_gate(ctx: Context) -> dict[str, Any]:
    from evaluation.adapters_cli import describe_promotion, gate_and_promote

    loaded = ctx.run.outputs("load")
    if "version" not in loaded:
        return {"decision": "no_change"}
    version = loaded["version"]
    if loaded["first_version"]:
        outputs = {"decision": "first_version", "version": version, "accepted": True}
        ctx.record("retrain_gate", "ok", **outputs, note="no active version to compare with")
        return outputs
    listed = ctx.listed() or {}
    if listed.get("active_version") == version:  # promoted before a crash
        outputs = {"decision": "accepted", "version": version, "accepted": True}
        ctx.record("retrain_gate", "ok", **outputs, note="already active")
        return outputs
    gate = ctx.config.gate
    outcome = gate_and_promote(
        ctx.name,
        version,
        gate.questions,
        url=ctx.config.server.url,
        key=ctx.key(),
        out=ctx.run.directory / "gate",
        metric=gate.metric,
        min_delta=gate.min_delta,
        limit=gate.limit,
        seed=gate.seed,
        max_tokens=gate.max_tokens,
        concurrency=gate.concurrency,
        progress=ctx.progress,
        requested_by=f"{ctx.who} retrain {ctx.run.id}",
    )
    print(describe_promotion(outcome))
    numbers = outcome["gate"]
    outputs = {
        "decision": outcome["decision"],
        "accepted": outcome["accepted"],
        "version": version,
        "active_before": outcome["active"],
        "active_now": outcome["active_now"],
        "metric": numbers["metric"],
        "min_delta": outcome["min_delta"],
        "questions": numbers["questions"],
        "active_mean": (numbers["active"] or {}).get("mean"),
        "candidate_mean": (numbers["candidate"] or {}).get("mean"),
        "paired": numbers["paired"],
        "reports": str(outcome["out"]),
    }
    ctx.record("retrain_gate", "ok", **outputs)
    return outputs


def step_finish(ctx: Context) -> dict[str, Any]:
    prepared = ctx.run.outputs("prepare")
    gated = ctx.run.outputs("gate")
    decision = gated.get("decision", "no_change")
    ctx.state.update(
        {
            "adapter": ctx.name,
            "last_run": ctx.run.id,
            "finished_at": _now(),
            "documents": prepared["document_hashes"],
            "feedback_ids": prepared["feedback_ids"],
            "data": prepared["data"],
            "data_hash": prepared["data_hash"],
            "decision": decision,
        }
    )
    if gated.get("version"):
        ctx.state["last_version"] = gated["version"]
    if gated.get("accepted"):
        ctx.state["promoted_version"] = gated["version"]
    ctx.state.pop("current_run", None)
    # the state first: a crash after it leaves a run record that nothing points to, never
    # a finished run whose changes the next run would not see
    _write_json(adapter_root(ctx.home, ctx.name) / "state.json", ctx.state)
    outputs = {"decision": decision, "version": gated.get("version")}
    ctx.record("retrain_finish", "ok", **outputs)
    return outputs


STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "prepare": step_prepare,
    "train": step_train,
    "load": step_load,
    "gate": step_gate,
    "finish": step_finish,
}


# ------------------------------------------------------------------------------- the run
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
        "started_at": _now(),
        "status": "running",
        "config": config.model_dump(mode="json"),
        "steps": {},
    }
    return Run(directory, record)


def _prune_runs(root: Path, state: dict[str, Any], keep: int) -> None:
    runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir())
    protected = {state.get("last_run"), state.get("current_run")}
    finished = [p for p in runs if _read_json(p / "run.json").get("status") == "finished"]
    for old in finished[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def status(config: RetrainConfig, home: Path) -> dict[str, Any]:
    """The adapter's state and its unfinished run, if any (no lock needed: read only)."""
    root = adapter_root(home, config.adapter)
    state = _read_json(root / "state.json")
    current = state.get("current_run")
    run = _read_json(root / "runs" / current / "run.json") if current else {}
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
    state = _read_json(state_path)
    current = state.get("current_run")
    run: Run | None = None
    if current and not restart and (root / "runs" / current / "run.json").is_file():
        run = Run(root / "runs" / current, _read_json(root / "runs" / current / "run.json"))
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
        _write_json(state_path, state)
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
        step.update({"status": "running", "started_at": _now()})
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
        step.update({"status": "done", "finished_at": _now(), "outputs": outputs})
        if name == "finish":
            run.record.update({"status": "finished", "finished_at": _now()})
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
