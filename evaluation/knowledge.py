"""The presets' knowledge adapter: documents -> training data that teaches the facts and
keeps the answer format -> a time-bounded LoRA.

Knowledge: the `raft` recipe (each generated question closed-book, and with its paragraph
among distractors in the server's RAG prompt, the answer citing it). Format: a share of
examples under the benchmark's own instruction (the system prompt every arm sends):
`claims` (yes / no / maybe about the documents' sentences, "Yes. <sentence>") for a
labelled benchmark, the knowledge questions themselves under the short-answer instruction
for a free-text one. Nothing is taken from the benchmark's questions, references or labels.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_SHARE = 0.3  # of the training examples; the rest teach the documents' facts
QUESTIONS_PER_UNIT = 8  # every sentence of a paragraph: a fact left unasked is not learnt


def _time_budget_callback(minutes: float) -> Any:
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stop training once `minutes` of wall time have passed (checked after each step)."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.stopped = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() - self.started > minutes * 60:
                control.should_training_stop = True
                self.stopped = True

    return TimeBudget()


def _short(row: dict[str, Any], sentences: int = 2) -> bool:
    from training.chunks import split_sentences

    return len(split_sentences(row["messages"][-1]["content"])) <= sentences


def with_system(row: dict[str, Any], system_prompt: str) -> dict[str, Any]:
    messages = [m for m in row["messages"] if m["role"] != "system"]
    return {**row, "messages": [{"role": "system", "content": system_prompt}, *messages]}


def mix(
    knowledge: list[dict[str, Any]],
    formatted: list[dict[str, Any]],
    share: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All knowledge rows plus format rows making up `share` of the result (fewer when there
    are not enough), shuffled with `seed` so a run cut short by time sees the same mix."""
    rng = random.Random(seed)
    wanted = round(len(knowledge) * share / (1 - share)) if share < 1 else len(formatted)
    picked = rng.sample(formatted, min(wanted, len(formatted)))
    rows = knowledge + picked
    rng.shuffle(rows)
    facts = {
        "knowledge_examples": len(knowledge),
        "format_examples": len(picked),
        "format_share": round(len(picked) / max(len(rows), 1), 3),
    }
    return rows, facts


def prepare_knowledge_data(
    corpus: Path,
    out: Path,
    system_prompt: str,
    labelled: bool,
    seed: int,
    source_labels: bool = False,
) -> dict[str, Any]:
    """Write `out/train.jsonl` (+ empty val/test, stats.json) and return what went in."""
    import json

    from ragtune.fileio import atomic_write_text
    from training.dataset import STATS_FILE, read_split, write_jsonl
    from training.prepare import PrepareOptions, prepare

    def run(recipe: str) -> list[dict[str, Any]]:
        prepare(
            PrepareOptions(
                sources=[corpus],
                recipe=recipe,
                out=out / recipe,
                qa_generator="template",
                questions_per_unit=QUESTIONS_PER_UNIT,
                val_ratio=0.0,  # knowledge injection: every document must be trained on
                test_ratio=0.0,
                seed=seed,
                source_labels=source_labels,  # the prompt the bench's server sends
            )
        )
        return read_split(out / recipe, "train")

    knowledge = run("raft")
    if labelled:
        formatted = [with_system(row, system_prompt) for row in run("claims")]
    else:
        formatted = [with_system(row, system_prompt) for row in knowledge if _short(row)]
    rows, facts = mix(knowledge, formatted, FORMAT_SHARE, seed)
    write_jsonl(out / "train.jsonl", rows)
    for split in ("val.jsonl", "test.jsonl"):
        write_jsonl(out / split, [])
    facts["format_recipe"] = "claims" if labelled else "raft (short answers, instructed)"
    atomic_write_text(out / STATS_FILE, json.dumps(facts, indent=2))
    return facts


def train_knowledge_adapter(
    corpus: Path,
    work: Path,
    train_config: Path,
    *,
    system_prompt: str,
    labelled: bool,
    seed: int,
    steps: int | None,
    minutes: float,
    progress: bool,
    source_labels: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """prepare (raft + format mix) -> train (time-bounded LoRA). Returns the adapter
    directory and what happened (reused or trained, timings, size, memory)."""
    from training.config import load_train_config
    from training.dataset import dataset_hash
    from training.trainer import train

    started = time.perf_counter()
    data = work / "prepared"
    info: dict[str, Any] = prepare_knowledge_data(
        corpus, data, system_prompt, labelled, seed, source_labels
    )
    info["documents"] = len(list(corpus.iterdir()))
    info["examples"] = info["knowledge_examples"] + info["format_examples"]
    prepare_s = time.perf_counter() - started
    overrides: dict[str, Any] = {"data": data, "progress": progress}
    if steps:
        overrides["max_steps"] = steps
    config = load_train_config(train_config, overrides)
    version = f"d{dataset_hash(data)[:10]}-s{config.max_steps}-m{minutes:g}"
    output = work / "adapters" / config.name / version
    info.update(prepare_s=round(prepare_s, 1), max_steps=config.max_steps, time_budget_min=minutes)
    if (output / "adapter_config.json").is_file():
        logger.info("reusing adapter %s (same data and config)", output)
        return output, {**_reused_facts(output), **info, "reused": True}
    config = config.model_copy(update={"output": output, "version": version})
    budget = _time_budget_callback(minutes)
    result = train(config, callbacks=[budget])
    info.update(
        reused=False,
        stopped_by_time_budget=budget.stopped,
        train_s=round(time.perf_counter() - started - prepare_s, 1),
        **{
            k: result.metrics.get(k)
            for k in ("global_step", "train_loss", "step_time_s", "peak_rss_bytes")
        },
    )
    batch = config.batch_size * config.gradient_accumulation
    info["examples_seen"] = (info["global_step"] or 0) * batch
    return result.adapter_dir, info


def _reused_facts(adapter: Path) -> dict[str, Any]:
    """What the manifest of a reused adapter says about its training."""
    import json

    manifest = adapter / "ragtune_adapter.json"
    if not manifest.is_file():
        return {}
    metrics = json.loads(manifest.read_text(encoding="utf-8")).get("metrics") or {}
    return {
        "global_step": metrics.get("global_step"),
        "train_loss": metrics.get("train_loss"),
        "train_s": metrics.get("duration_s"),
        "peak_rss_bytes": metrics.get("peak_rss_bytes"),
    }
