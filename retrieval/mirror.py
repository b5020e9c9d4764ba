"""Indexes in a remote store (S3, ...), mirrored into the local cache FAISS reads from.

Every server writes and reads its indexes in its local copy (`<cache>/indexes`, the usual
layout: one directory per generation and a CURRENT pointer). After a local write, the new
generation is published to the store (files, then their manifest: ragtune/store.py) and
then `registry/indexes.json`, one small document naming each index's current generation.
Other servers poll that document and download a generation they do not have before they
switch their local CURRENT to it, so a search never reads half an index. A deleted index
leaves the document and then each local copy. Local stores need none of this: the servers
read the same directory.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from ragtune.fileio import atomic_write_text
from ragtune.store import Store
from retrieval.errors import IndexUnavailableError
from retrieval.generation import CURRENT, GENERATION_PATTERN
from retrieval.store import NAME_PATTERN

logger = logging.getLogger(__name__)

POINTERS = "registry/indexes.json"


class IndexMirror:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.local("indexes")
        self.revision = -1
        self._known: set[str] = set()  # indexes this mirror has seen in the store
        self._lock = threading.RLock()
        self._applying = False

    def push(self, name: str) -> None:
        """After a local write or delete of `name`: publish it (or its removal)."""
        try:
            self._push(name)
        except Exception as exc:
            logger.error("index %s: publishing to the store failed: %s", name, exc)
            raise IndexUnavailableError(
                f"index {name!r} changed on this server but could not be published to the "
                "shared store; retry the call"
            ) from exc

    def _push(self, name: str) -> None:
        with self._lock:
            if self._applying:
                return
            doc = self.store.read_json(POINTERS) or {"revision": 0, "indexes": {}}
            generation = self._local_generation(name)
            if generation is None:
                doc["indexes"].pop(name, None)
                self._known.discard(name)
            else:
                rel = f"indexes/{name}/{generation}"
                self.store.publish_dir(rel, self.root / name / generation)
                doc["indexes"][name] = generation
                self._known.add(name)
            doc["revision"] = max(int(doc["revision"]), self.revision) + 1
            self.store.write_json(POINTERS, doc)
            self.revision = doc["revision"]
            if generation is None:
                self.store.delete(f"indexes/{name}")

    def changed(self) -> bool:
        doc = self.store.read_json(POINTERS)
        return doc is not None and doc.get("revision") != self.revision

    def pull(self) -> None:
        """Bring the local copy to the store's current generations (downloads run here)."""
        with self._lock:
            doc = self.store.read_json(POINTERS)
            if doc is None or doc.get("revision") == self.revision:
                return
            self._applying = True
            try:
                for name, generation in doc["indexes"].items():
                    if not (
                        NAME_PATTERN.fullmatch(name) and GENERATION_PATTERN.fullmatch(generation)
                    ):
                        logger.warning("store names an invalid index %r@%r", name, generation)
                        continue
                    if self._local_generation(name) != generation:
                        self.store.fetch_dir(f"indexes/{name}/{generation}")
                        atomic_write_text(self.root / name / CURRENT, generation + "\n")
                        logger.info("index %s: now at %s from the store", name, generation)
                    self._known.add(name)
                for name in sorted(self._known - set(doc["indexes"])):
                    self._remove_local(name)
                    self._known.discard(name)
            finally:
                self._applying = False
            self.revision = doc["revision"]

    def _local_generation(self, name: str) -> str | None:
        try:
            return (self.root / name / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None

    def _remove_local(self, name: str) -> None:
        directory: Path = self.root / name
        (directory / CURRENT).unlink(missing_ok=True)  # readers see it gone from here on
        shutil.rmtree(directory, ignore_errors=True)
        logger.info("index %s: deleted in the store, removed here", name)
