"""One benchmark run end to end: questions -> (index) -> server -> arms -> scores -> reports.

`run_bench` is what `ragtune bench` and the presets call; it returns the results dict that
was written to `out/results.json`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation import stats
from evaluation.dataset import answer_choices, label_set, load_dataset
from evaluation.report import build_results, write_reports
from evaluation.runner import (
    GENERATION_SCORES_KEY,
    GenerationSettings,
    default_system_prompt,
    parse_arms,
    run_all,
)
from evaluation.scoring import summarise

logger = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    dataset: Path
    out: Path
    arms: str = "base,rag,ft,ft+rag"
    index: str | None = None
    adapter: str | None = None
    url: str | None = None
    api_key: str | None = None
    limit: int | None = None
    seed: int = 0
    max_tokens: int = 64
    top_k: int = 3
    mode: str | None = None
    concurrency: int = 8
    system_prompt: str | None = None
    index_root: Path | None = None
    build_index: bool = False
    config: str | None = None
    resamples: int = stats.DEFAULT_RESAMPLES
    progress: bool = True
    name: str | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    likelihood: bool = True
    # "echo": every question's prompt scored by a request of its own, as lm-eval sends it
    # (the same numbers lm-eval gets); "generation": read from the generation request's own
    # logprobs where they hold the answer (likelihood.scores_from_generation: no second
    # prefill; the same numbers where a prompt's rows do not depend on a token appended
    # after them, which ragtune's engine keeps on every device); "auto": generation against
    # the server the bench starts, echo against another (--url)
    likelihood_from: str = "auto"
    extra_run_info: dict[str, Any] = field(default_factory=dict)


def likelihood_route(options: BenchOptions) -> str:
    """`likelihood_from` resolved: "auto" reads from generation only on a server the bench
    started (ragtune's own engine)."""
    if options.likelihood_from == "auto":
        return "echo" if options.url else "generation"
    return options.likelihood_from


def _adapter_info(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    manifest = path / "ragtune_adapter.json"
    info: dict[str, Any] = {"path": str(path)}
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        info.update({k: data.get(k) for k in ("name", "version", "method", "rank", "data_hash")})
        metrics = data.get("metrics") or {}
        info["train"] = {
            k: metrics.get(k)
            for k in ("train_loss", "eval_loss", "initial_eval_loss", "global_step", "duration_s")
        }
    return info


def _score_likelihood(
    target: Any,
    arms: list[Any],
    items: list[Any],
    rows: dict[str, list[dict[str, Any]]],
    settings: GenerationSettings,
    root: Path | None,
    options: BenchOptions,
) -> dict[str, Any] | None:
    """Likelihood scoring of the rows with an answer set or a reference (None: neither)."""
    from evaluation.indexing import index_root
    from evaluation.likelihood_arms import LikelihoodSettings, score_arms
    from evaluation.lm_eval_tasks import write_lm_eval_tasks
    from evaluation.server_api import ScoringClient
    from ragtune.config import load_settings

    labels = label_set(items)
    if not any(answer_choices(item, labels) or item.answers for item in items):
        return None
    retrieval = load_settings(options.config).retrieval
    if root is None and not options.url:  # a started server reads the configured root
        root = index_root(options.config, None)
    scoring = LikelihoodSettings(
        base_model=target.base_model,
        system_prompt=settings.system_prompt,
        labels=labels,
        index=options.index,
        index_root=root,
        max_source_chars=retrieval.max_source_chars,
        source_labels=retrieval.source_labels,
        concurrency=settings.concurrency,
    )
    client = ScoringClient(target.v1, target.api_key)
    started = time.perf_counter()
    try:
        per_arm = score_arms(client, arms, items, rows, scoring, options.progress)
    finally:
        client.close()
    tasks = write_lm_eval_tasks(options.out, rows)
    return {"seconds": round(time.perf_counter() - started, 1), "arms": per_arm, "lm_eval": tasks}


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every arm over the dataset and write results.json, report.md and report.html."""
    from evaluation.indexing import build_context_index, index_root
    from evaluation.target import open_target, resolve_adapter
    from ragtune.config import default_home

    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    items = load_dataset(options.dataset, options.limit)
    labels = label_set(items) or ("yes", "no", "maybe")
    wants_ft = any(a.strip().startswith("ft") for a in options.arms.split(","))
    adapter = None
    if wants_ft:
        if not options.adapter:
            raise ValueError("the ft and ft+rag arms need --adapter NAME")
        adapter = resolve_adapter(options.adapter, default_home(), must_exist=not options.url)
    index_info: dict[str, Any] | None = None
    root = options.index_root
    if options.build_index:
        if not options.index:
            raise ValueError("--build-index needs --index NAME")
        if options.url and root is None:
            raise ValueError("--build-index with --url needs --index-root (the server's root)")
        root = index_root(options.config, root)
        # Every context in the file, not only the --limit questions': the others are the
        # distractors that make retrieval a real search.
        index_info = build_context_index(
            load_dataset(options.dataset), options.index, root, options.config, options.progress
        )
    # labelled questions: each request also returns what scoring their choices needs
    choice_rows = options.likelihood and any(
        answer_choices(item, label_set(items)) for item in items
    )
    settings = GenerationSettings(
        max_tokens=options.max_tokens,
        seed=options.seed,
        system_prompt=options.system_prompt or default_system_prompt(items),
        index=options.index,
        top_k=options.top_k,
        mode=options.mode,
        concurrency=options.concurrency,
        score_from_generation=choice_rows and likelihood_route(options) == "generation",
        first_token_alternatives=choice_rows,  # which choice to echo (likelihood.least_likely)
    )
    options.out.mkdir(parents=True, exist_ok=True)
    with open_target(
        options.url,
        api_key=options.api_key,
        adapter=adapter,
        index_root=root,
        config=options.config,
        log_path=options.out / "server.log",
        extra_env=options.server_env,
    ) as target:
        arms = parse_arms(options.arms, target.base_model, adapter.name if adapter else None)
        client = target.client()
        generation_started = time.perf_counter()
        rows = run_all(client, arms, items, settings, options.progress)
        generation_s = time.perf_counter() - generation_started
        likelihood = None
        if options.likelihood:
            likelihood = _score_likelihood(target, arms, items, rows, settings, root, options)
        for arm_rows in rows.values():  # the reused scores are not kept in results.json
            for row in arm_rows:
                row.pop(GENERATION_SCORES_KEY, None)
        server = options.url or "a server started by the bench"
    summary = summarise(
        items,
        rows,
        labels=labels,
        top_k=options.top_k,
        seed=options.seed,
        resamples=options.resamples,
    )
    run = {
        "dataset": str(options.dataset),
        "dataset_name": options.name or options.dataset.stem,
        "questions": len(items),
        "limit": options.limit,
        "seed": options.seed,
        "resamples": options.resamples,
        "settings": asdict(settings),
        "arms": {arm.name: {"model": arm.model, "rag": arm.rag} for arm in arms},
        "adapter": _adapter_info(adapter.path if adapter else None)
        or ({"name": adapter.name} if adapter else None),
        "index": index_info or ({"name": options.index} if options.index else None),
        "server": server,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "generation_s": round(generation_s, 1),
        "likelihood": likelihood,
        "started_at": started_at,
        **options.extra_run_info,
    }
    run["duration_s"] = round(time.perf_counter() - started, 1)
    results = build_results(run, summary, rows, items)
    write_reports(options.out, results)
    return results
