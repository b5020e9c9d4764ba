"""The prepared dataset on disk: `train.jsonl`, `val.jsonl`, `test.jsonl` (one chat example
per line: {"messages": [...], "doc_id", "recipe"}) and `stats.json`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ragtune.fileio import sha256_file

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
