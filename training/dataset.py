"""The prepared dataset on disk: `train.jsonl`, `val.jsonl`, `test.jsonl` (one chat example
per line: {"messages": [...], "doc_id", "recipe"}) and `stats.json`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ragtune.fileio import atomic_directory, atomic_write_text, sha256_file

SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
STATS_FILE = "stats.json"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_split(data_dir: Path, split: str) -> list[dict[str, Any]]:
    return read_jsonl(data_dir / SPLIT_FILES[split])


def dataset_hash(data_dir: Path) -> str:
    """sha256 over the split files present, recorded in adapter manifests as lineage."""
    digest = hashlib.sha256()
    for split, name in SPLIT_FILES.items():
        path = data_dir / name
        if path.is_file():
            digest.update(f"{split}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def write_split_dataset(
    out: Path,
    examples: list[Any],
    *,
    val_ratio: float,
    test_ratio: float,
    seed: int,
    summarize: Callable[[dict[str, list[Any]], dict[str, str]], dict[str, Any]],
    doc_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Split `examples` by their documents (`doc_id`: all of a document's examples in one
    split; `doc_ids`, default the examples', are the documents the split is drawn over),
    write the split files and stats.json as one atomic directory, and return the stats: the
    common fields, then `summarize(by_split, assignment)`'s own."""
    from training.split import split_documents

    assignment = split_documents(
        doc_ids if doc_ids is not None else [example.doc_id for example in examples],
        val_ratio=val_ratio,
        test_ratio=test_ratio,
        seed=seed,
    )
    by_split: dict[str, list[Any]] = {split: [] for split in SPLIT_FILES}
    for example in examples:
        by_split[assignment[example.doc_id]].append(example)
    with atomic_directory(out) as scratch:
        for split, name in SPLIT_FILES.items():
            write_jsonl(scratch / name, (example.to_json() for example in by_split[split]))
        summary = {
            "examples": {split: len(rows) for split, rows in by_split.items()},
            "seed": seed,
            "split_ratios": {"val": val_ratio, "test": test_ratio},
            "data_hash": dataset_hash(scratch),
            **summarize(by_split, assignment),
        }
        atomic_write_text(scratch / STATS_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
