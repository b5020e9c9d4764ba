"""`ragtune train --rank auto` (and, for sparse, `--density auto`): choose the adapter budget
by a sweep on the validation split within a time budget.

* **Candidates**: `search.ranks` (or `search.densities`), smallest first. Each is trained with
  the run's full settings (max_steps, learning rate, early stopping on the validation split)
  into a hidden scratch directory beside the version (`.VERSION.sweep/`), so the chosen one
  is the final adapter as it is: no retraining, and the budget bounds the whole command.
* **Budget**: the first candidate always runs. Before each later one the sweep estimates its
  time from the ones done (the last one's seconds times the growth from the one before it,
  at least 1, at most 2) and does not start it if the elapsed time plus the estimate would
  pass `search.budget_minutes`; the candidates not started are recorded as skipped.
* **Rule** (validation loss per trainable parameter): every candidate starts from the same
  validation loss (LoRA's B and SHiRA's values start at zero). The gain of a candidate is
  that starting loss minus its final (best-checkpoint) validation loss. The chosen one is the
  candidate with the fewest trainable parameters whose gain is at least (1 - `tolerance`) of
  the largest gain (tolerance 0.05: 95 %). If no candidate gains, the lowest loss is chosen.
* **Record**: the manifest's metrics get `rank_search`: each candidate's rank, density,
  trainable parameters, validation loss, steps and seconds, the skipped ones, the rule, the
  budget and the total time; its `config` is the chosen candidate's (a concrete rank), so
  retraining from a manifest reproduces the chosen adapter without another sweep.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.fileio import atomic_directory
from ragtune.manifest import MANIFEST_NAME, AdapterManifest
from training.dataset import read_split

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.trainer import TrainResult

logger = logging.getLogger(__name__)

MAX_GROWTH = 2.0


def candidates(config: TrainConfig) -> list[tuple[str, float]]:
    """("r", rank) or ("density", fraction) pairs, smallest budget first, no repeats."""
    if config.adapter.density == "auto":
        return [("density", d) for d in sorted(set(config.search.densities))]
    return [("r", r) for r in sorted(set(config.search.ranks))]


def estimate_next(durations: list[float]) -> float:
    """Seconds the next (larger) candidate should take, from the ones done."""
    if not durations:
        return 0.0
    growth = 1.0
    if len(durations) >= 2 and durations[-2] > 0:
        growth = min(MAX_GROWTH, max(1.0, durations[-1] / durations[-2]))
    return durations[-1] * growth


def choose(results: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The rule of the module docstring over the candidates' records."""
    scored = [r for r in results if r.get("eval_loss") is not None]
    if not scored:
        raise ValueError("no candidate of the sweep produced a validation loss")
    best = min(scored, key=lambda r: (r["eval_loss"], r["trainable_params"]))
    start = best["initial_eval_loss"]
    best_gain = start - best["eval_loss"] if start is not None else 0.0
    if best_gain <= 0:
        return best
    enough = [r for r in scored if start - r["eval_loss"] >= (1 - tolerance) * best_gain]
    return min(enough, key=lambda r: (r["trainable_params"], r["eval_loss"]))


def _candidate_config(config: TrainConfig, kind: str, value: float, output: Path) -> TrainConfig:
    candidate = config.model_copy(deep=True)
    if kind == "r":
        candidate.adapter.r = int(value)
    else:
        candidate.adapter.r = 1  # replaced by the rank the density gives
        candidate.adapter.density = float(value)
    candidate.output = output
    candidate.version = None
    candidate.keep_checkpoints = False
    return candidate


def train_with_search(
    config: TrainConfig,
    home: Path,
    callbacks: list[Any] | None = None,
    resume: str | None = None,
) -> TrainResult:
    from training.trainer import TrainResult, train
    from training.versions import resolve_adapter_dir

    if resume is not None:
        raise ValueError("--resume does not apply to --rank auto / --density auto")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--rank auto / --density auto run in one process, not under torchrun")
    if not read_split(config.data, "val"):
        raise ValueError(
            f"--rank auto / --density auto choose by validation loss, and "
            f"{config.data / 'val.jsonl'} has no examples: prepare with --val-ratio > 0"
        )
    if not read_split(config.data, "train"):
        raise FileNotFoundError(f"no training examples in {config.data / 'train.jsonl'}")
    adapter_dir = resolve_adapter_dir(config, home, None)
    if adapter_dir.exists():
        raise ValueError(f"{adapter_dir} already exists; adapter versions are immutable")
    sweep_dir = adapter_dir.parent / f".{adapter_dir.name}.sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # scratch of an interrupted sweep

    budget_s = config.search.budget_minutes * 60
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    durations: list[float] = []
    todo = candidates(config)
    for index, (kind, value) in enumerate(todo):
        elapsed = time.monotonic() - started
        estimate = estimate_next(durations)
        if results and elapsed + estimate > budget_s:
            skipped = [{kind: v} for _, v in todo[index:]]
            logger.info(
                "rank search: %.0f s spent, the next candidate would take ~%.0f s of the "
                "%.0f s budget: stopping before %s=%s",
                elapsed,
                estimate,
                budget_s,
                kind,
                value,
            )
            break
        label = f"{kind}-{value:g}"
        logger.info("rank search: training candidate %s=%s", kind, value)
        candidate_started = time.monotonic()
        candidate = _candidate_config(config, kind, value, sweep_dir / label)
        result = train(candidate, home=home, callbacks=callbacks)
        seconds = time.monotonic() - candidate_started
        durations.append(seconds)
        metrics = result.metrics
        selection = metrics.get("sparse_selection") or {}
        results.append(
            {
                "candidate": {kind: value},
                "r": selection.get("r", int(value) if kind == "r" else None),
                "density": selection.get("density"),
                "trainable_params": metrics["trainable_params"],
                "eval_loss": metrics["eval_loss"],
                "initial_eval_loss": metrics["initial_eval_loss"],
                "global_step": metrics["global_step"],
                "stopped_early": metrics["stopped_early"],
                "seconds": round(seconds, 1),
                "estimated_s": round(estimate, 1) if index else None,
                "dir": result.adapter_dir,
            }
        )
    winner = choose(results, config.search.tolerance)
    search_record = {
        "swept": "density" if config.adapter.density == "auto" else "r",
        "rule": (
            f"fewest trainable parameters with at least {1 - config.search.tolerance:.0%} of "
            "the best candidate's validation-loss reduction (the lowest loss if none reduces it)"
        ),
        "tolerance": config.search.tolerance,
        "budget_s": round(budget_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "chosen": winner["candidate"],
        "candidates": [
            {k: v for k, v in r.items() if k != "dir"} | {"chosen": r is winner} for r in results
        ],
        "skipped": skipped,
    }
    logger.info(
        "rank search chose %s (eval_loss %s, %d trainable parameters) of %d candidates in %.0f s",
        winner["candidate"],
        winner["eval_loss"],
        winner["trainable_params"],
        len(results),
        search_record["total_s"],
    )
    manifest = _publish(winner["dir"], adapter_dir, config, search_record)
    shutil.rmtree(sweep_dir, ignore_errors=True)
    return TrainResult(adapter_dir=adapter_dir, metrics=manifest.metrics)


def _publish(
    chosen_dir: Path, adapter_dir: Path, config: TrainConfig, search_record: dict[str, Any]
) -> AdapterManifest:
    """The chosen candidate's PEFT files under the version's name, its manifest with the
    sweep added (renamed into place once complete, like every adapter version)."""
    if adapter_dir.exists():  # written by another run during the sweep: never replace it
        raise ValueError(f"{adapter_dir} appeared during the sweep; adapter versions are immutable")
    manifest = AdapterManifest.read(chosen_dir)
    if manifest is None:
        raise RuntimeError(f"{chosen_dir} has no {MANIFEST_NAME}")
    manifest.version = adapter_dir.name
    manifest.metrics = {**manifest.metrics, "rank_search": search_record}
    manifest.config = {
        **manifest.config,
        "output": str(config.output) if config.output is not None else None,
        "version": config.version,
    }
    with atomic_directory(adapter_dir) as scratch:
        for path in chosen_dir.iterdir():
            if path.is_file() and path.name != MANIFEST_NAME:
                shutil.copy2(path, scratch / path.name)
        manifest.write(scratch)
    return manifest
