"""End-to-end presets: data -> index -> knowledge adapter -> all four arms -> report.

`pubmedqa`: the questions' abstracts (contexts without the conclusion) are indexed for the
RAG arms and, as plain text files, turned into training data with `ragtune prepare --recipe
qa` for a LoRA "knowledge" adapter (the unsupervised knowledge-injection setting of Ovadia
et al. 2023). Neither the index nor the adapter ever sees a conclusion (`long_answer`) or a
label (`final_decision`), which are what the benchmark scores. Everything the preset makes
lives under `--out` (work/), so runs do not touch $RAGTUNE_HOME; an adapter trained on the
same data with the same config is reused by a later run with the same --out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.bench import BenchOptions, run_bench
from evaluation.dataset import QAItem, context_documents, load_dataset
from evaluation.report import write_reports

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("pubmedqa",)
INDEX_NAME = "pubmedqa"


@dataclass
class PresetOptions:
    out: Path
    limit: int | None = None
    dataset: Path = REPO / "data" / "pubmedqa" / "pqal_dev.jsonl"
    train_config: Path = REPO / "configs" / "bench" / "pubmedqa-train.yaml"
    adapter: str | None = None
    train_steps: int | None = None
    train_minutes: float | None = None
    seed: int = 0
    max_tokens: int = 32
    top_k: int = 3
    concurrency: int = 16
    resamples: int = 2000
    progress: bool = True
    config: str | None = None
    arms: str = "base,rag,ft,ft+rag"
    mode: str | None = None
    system_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return bool(self.limit)


def write_corpus(items: list[QAItem], directory: Path) -> int:
    """One text file per abstract (`<pmid>.txt`, a paragraph per section) for `prepare`."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.txt"):
        stale.unlink()
    documents = context_documents(items)
    for doc_id, _title, text in documents:
        name = doc_id.removeprefix("pubmedqa:")
        (directory / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return len(documents)


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


def train_knowledge_adapter(
    items: list[QAItem], work: Path, options: PresetOptions
) -> tuple[Path, dict[str, Any]]:
    """prepare (qa recipe, templates, every abstract in train) -> train (time-bounded LoRA).
    Returns the adapter directory and what happened (reused or trained, timings)."""
    from training.config import load_train_config
    from training.dataset import dataset_hash
    from training.prepare import PrepareOptions, prepare
    from training.trainer import train

    started = time.perf_counter()
    corpus = work / "corpus"
    documents = write_corpus(items, corpus)
    data = work / "prepared"
    stats = prepare(
        PrepareOptions(
            sources=[corpus],
            recipe="qa",
            out=data,
            qa_generator="template",
            val_ratio=0.0,  # knowledge injection: every abstract must be trained on
            test_ratio=0.0,
            seed=options.seed,
        )
    )
    prepare_s = time.perf_counter() - started
    steps = options.train_steps or (12 if options.quick else None)
    minutes = options.train_minutes or (1.0 if options.quick else 8.0)
    overrides: dict[str, Any] = {"data": data, "progress": options.progress}
    if steps:
        overrides["max_steps"] = steps
    config = load_train_config(options.train_config, overrides)
    version = f"d{dataset_hash(data)[:10]}-s{config.max_steps}-m{minutes:g}"
    output = work / "adapters" / config.name / version
    info: dict[str, Any] = {
        "documents": documents,
        "examples": stats["examples"]["train"],
        "prepare_s": round(prepare_s, 1),
        "max_steps": config.max_steps,
        "time_budget_min": minutes,
    }
    if (output / "adapter_config.json").is_file():
        logger.info("reusing adapter %s (same data and config)", output)
        return output, {**info, "reused": True}
    config = config.model_copy(update={"output": output, "version": version})
    budget = _time_budget_callback(minutes)
    result = train(config, callbacks=[budget])
    info.update(
        reused=False,
        stopped_by_time_budget=budget.stopped,
        train_s=round(time.perf_counter() - started - prepare_s, 1),
        **{k: result.metrics.get(k) for k in ("global_step", "train_loss", "step_time_s")},
    )
    info["examples_seen"] = (info["global_step"] or 0) * config.batch_size
    return result.adapter_dir, info


def run_pubmedqa(options: PresetOptions) -> dict[str, Any]:
    """The whole PubMedQA preset; returns the results written to `options.out`."""
    from evaluation.indexing import build_context_index

    started = time.perf_counter()
    if not options.dataset.is_file():
        raise FileNotFoundError(
            f"{options.dataset} is missing; the preset expects the repository's "
            "data/pubmedqa/pqal_dev.jsonl (or pass --dataset)"
        )
    items = load_dataset(options.dataset, options.limit)
    work = options.out / "work"
    root = work / "indexes"
    index_info = build_context_index(items, INDEX_NAME, root, options.config, options.progress)
    training: dict[str, Any] | None = None
    adapter = options.adapter
    if adapter is None and any(a.startswith("ft") for a in options.arms.split(",")):
        path, training = train_knowledge_adapter(items, work, options)
        adapter = f"pubmedqa-knowledge={path}"
    prepared_s = time.perf_counter() - started
    results = run_bench(
        BenchOptions(
            dataset=options.dataset,
            out=options.out,
            arms=options.arms,
            index=INDEX_NAME,
            adapter=adapter,
            limit=options.limit,
            seed=options.seed,
            max_tokens=options.max_tokens,
            top_k=options.top_k,
            mode=options.mode,
            system_prompt=options.system_prompt,
            concurrency=options.concurrency,
            index_root=root,
            config=options.config,
            resamples=options.resamples,
            progress=options.progress,
            name="PubMedQA (PQA-L)" + (f", first {options.limit}" if options.limit else ""),
            extra_run_info={
                "preset": "pubmedqa",
                "index_build": index_info,
                "training": training,
                "preparation_s": round(prepared_s, 1),
                **options.extra,
            },
        )
    )
    total = round(time.perf_counter() - started, 1)
    results["run"]["preset_total_s"] = total
    write_reports(options.out, results)
    logger.info("preset pubmedqa finished in %.0fs: %s", total, options.out / "report.html")
    return results
