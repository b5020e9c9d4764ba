"""The steps of a `ragtune retrain` run (prepare, train, load, gate, finish), each taking
the run's Context and returning the outputs its run record keeps (training/retrain.py)."""

import contextlib
import gc
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.dataset import SPLIT_FILES, read_split, write_split_dataset
from training.dedupe import remove_exact
from training.records import Example
from training.retrain_context import (
    VERSION_NAME,
    Context,
    adapter_root,
    changes,
    feedback_source,
    now,
    read_json,
    write_json,
)

logger = logging.getLogger(__name__)


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
        numbers += [int(m.group(1)) for p in root.iterdir() if (m := VERSION_NAME.match(p.name))]
    with contextlib.suppress(Exception):  # the server may be down now; load checks again
        listed = ctx.listed()
        for version in (listed or {}).get("versions", []):
            if m := VERSION_NAME.match(version["version"]):
                numbers.append(int(m.group(1)))
    return f"v{max(numbers) + 1}"


def step_train(ctx: Context) -> dict[str, Any]:
    from ragtune.manifest import MANIFEST_NAME
    from training.config import load_train_config
    from training.versions import checkpoint_dir_for

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
        metrics = read_json(adapter_dir / MANIFEST_NAME).get("metrics", {})
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
            "finished_at": now(),
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
    write_json(adapter_root(ctx.home, ctx.name) / "state.json", ctx.state)
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
