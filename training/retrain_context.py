"""What a `ragtune retrain` run works with: its lock, its run record (which steps finished,
their outputs), the context the steps share, and the scan for changed documents and new
feedback (training/retrain.py runs the steps)."""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.fileio import atomic_write_text
from training.retrain_config import RetrainConfig

logger = logging.getLogger(__name__)


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3  # as `ragtune adapters promote`
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock; try again later

STEPS = ("prepare", "train", "load", "gate", "finish")
VERSION_NAME = re.compile(r"^\.?v(\d+)(\.checkpoints)?$")


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
        holder = {"pid": os.getpid(), "adapter": adapter, "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield path
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- run state
def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
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
        write_json(self.directory / "run.json", self.record)

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
