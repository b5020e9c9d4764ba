"""End-to-end presets: documents -> index -> knowledge adapter -> all four arms -> report.

* `pubmedqa`: 500 expert-labelled PubMedQA questions; their abstracts (contexts, without
  the conclusion) are the documents. Scored by likelihood (yes / no / maybe) and by the
  generated answers.
* `demo`: the fictional Orvane Logistics documents (data/demo/docs: facts no model can
  know) with 20 held-out questions (keyword hit rate, token F1).
* `demo-ja`: the Japanese demo (data/demo-ja) on the bundled Gemma 3 270M.

The index and the knowledge adapter (`evaluation.knowledge`) see only the documents, never
the benchmark's questions, references or labels. Everything a preset makes lives under
`--out` (work/), so runs do not touch $RAGTUNE_HOME; an adapter trained on the same data
with the same config is reused by a later run with the same --out.
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
from evaluation.runner import default_system_prompt

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    dataset: Path
    train_config: Path
    docs: Path | None = None  # None: the dataset's own contexts are the documents
    model: str | None = None  # the server's model.source (None: the configured one)
    max_tokens: int = 32
    minutes: float = 8.0  # training budget of a full run
    quick_minutes: float = 1.0  # and of a --limit run
    quick_steps: int | None = 12


PRESETS: dict[str, Preset] = {
    "pubmedqa": Preset(
        "pubmedqa",
        "PubMedQA (PQA-L)",
        REPO / "data" / "pubmedqa" / "pqal_dev.jsonl",
        REPO / "configs" / "bench" / "pubmedqa-train.yaml",
    ),
    "demo": Preset(
        "demo",
        "Orvane Logistics demo (new knowledge)",
        REPO / "data" / "demo" / "eval_questions.jsonl",
        REPO / "configs" / "bench" / "demo-train.yaml",
        docs=REPO / "data" / "demo" / "docs",
        max_tokens=48,
        minutes=8.0,
        quick_minutes=8.0,
        quick_steps=None,
    ),
    "demo-ja": Preset(
        "demo-ja",
        "Orvane Logistics demo, Japanese (new knowledge)",
        REPO / "data" / "demo-ja" / "eval_questions.jsonl",
        REPO / "configs" / "bench" / "demo-ja-train.yaml",
        docs=REPO / "data" / "demo-ja" / "docs",
        model="bundled:gemma-3-270m",
        max_tokens=64,
        minutes=8.0,
        quick_minutes=8.0,
        quick_steps=None,
    ),
}


@dataclass
class PresetOptions:
    out: Path
    preset: str = "pubmedqa"
    limit: int | None = None
    adapter: str | None = None
    train_steps: int | None = None
    train_minutes: float | None = None
    seed: int = 0
    max_tokens: int | None = None
    top_k: int = 3
    concurrency: int = 16
    resamples: int = 2000
    progress: bool = True
    config: str | None = None
    arms: str = "base,rag,ft,ft+rag"
    mode: str | None = None
    system_prompt: str | None = None
    likelihood: bool = True
    likelihood_from: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


def write_corpus(items: list[QAItem], directory: Path) -> int:
    """One text file per context (`<id>.txt`, a paragraph per section) for `prepare`."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.txt"):
        stale.unlink()
    documents = context_documents(items)
    for doc_id, _title, text in documents:
        name = doc_id.removeprefix("pubmedqa:")
        (directory / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    return len(documents)


def build_docs_index(docs: Path, name: str, root: Path, config: str | None, progress: bool):
    """Index every document file under `docs` (their paths are the sources)."""
    from ragtune.config import load_settings
    from retrieval.store import IndexStore

    settings = load_settings(config).retrieval.model_copy(update={"root": root})
    report = IndexStore(root, config=settings).build(name, [docs], progress=progress)
    return {
        "name": name,
        "root": str(root),
        "documents": report.documents,
        "chunks": report.chunks,
        "build_seconds": round(report.seconds, 1),
    }


def run_preset(options: PresetOptions) -> dict[str, Any]:
    """One preset end to end; returns the results written to `options.out`."""
    from evaluation.indexing import build_context_index
    from evaluation.knowledge import train_knowledge_adapter
    from ragtune.config import load_settings

    preset = PRESETS[options.preset]
    started = time.perf_counter()
    if not preset.dataset.is_file():
        raise FileNotFoundError(
            f"{preset.dataset} is missing; the preset needs the repository's data/"
        )
    items = load_dataset(preset.dataset, options.limit)
    work = options.out / "work"
    root = work / "indexes"
    if preset.docs is None:
        index_info = build_context_index(items, preset.name, root, options.config, options.progress)
    else:
        index_info = build_docs_index(
            preset.docs, preset.name, root, options.config, options.progress
        )
    system_prompt = options.system_prompt or default_system_prompt(items)
    training: dict[str, Any] | None = None
    adapter = options.adapter
    if adapter is None and any(a.strip().startswith("ft") for a in options.arms.split(",")):
        corpus = preset.docs
        if corpus is None:
            corpus = work / "corpus"
            write_corpus(items, corpus)
        quick = bool(options.limit)
        path, training = train_knowledge_adapter(
            corpus,
            work,
            preset.train_config,
            system_prompt=system_prompt,
            labelled=any(item.label for item in items),
            seed=options.seed,
            steps=options.train_steps or (preset.quick_steps if quick else None),
            minutes=options.train_minutes or (preset.quick_minutes if quick else preset.minutes),
            progress=options.progress,
            source_labels=load_settings(options.config).retrieval.source_labels,
        )
        adapter = f"{preset.name}-knowledge={path}"
    prepared_s = time.perf_counter() - started
    env = {"RAGTUNE_MODEL__SOURCE": preset.model} if preset.model else {}
    results = run_bench(
        BenchOptions(
            dataset=preset.dataset,
            out=options.out,
            arms=options.arms,
            index=preset.name,
            adapter=adapter,
            limit=options.limit,
            seed=options.seed,
            max_tokens=options.max_tokens or preset.max_tokens,
            top_k=options.top_k,
            mode=options.mode,
            system_prompt=system_prompt,
            concurrency=options.concurrency,
            index_root=root,
            config=options.config,
            resamples=options.resamples,
            progress=options.progress,
            likelihood=options.likelihood,
            likelihood_from=options.likelihood_from,
            server_env=env,
            name=preset.title + (f", first {options.limit}" if options.limit else ""),
            extra_run_info={
                "preset": preset.name,
                "model_source": preset.model,
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
    logger.info("preset %s finished in %.0fs: %s", preset.name, total, options.out / "report.html")
    return results
