"""The adapter registry: names, versions, which version is active, which are resident.

Loads run on worker threads and validate everything before touching shared state, so a failed
load changes nothing. Requests hold a reference to the exact weights they resolved, so a swap,
rollback or unload never changes a request that is already running; new requests see the new
state at once. Resident weights are bounded (least recently used go back to disk and are
reloaded on demand, like vLLM's max_cpu_loras).

Servers sharing a store keep their registries in step through two hooks (see
server/adapters/shared.py): `before_change` runs before an admin change (read the store's
state first), `after_change` after it succeeded (publish the new state).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.adapters.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    AdapterUnavailableError,
)
from server.adapters.loader import BaseSpec, LoadedAdapter, file_signature, read_adapter
from server.adapters.paths import confine
from server.engine.lora import AdapterWeights

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass
class AdapterVersion:
    name: str
    version: str
    path: Path
    rank: int
    target_modules: list[str]
    manifest: dict[str, Any]
    weights: AdapterWeights | None  # None = on disk only
    nbytes: int
    files: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    last_used: float | None = None
    requests: int = 0


@dataclass
class AdapterRecord:
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    active: str | None = None
    history: list[str] = field(default_factory=list)  # previously active versions, newest last


class AdapterRegistry:
    def __init__(self, spec: BaseSpec, roots: list[Path], max_resident: int, base_model_id: str):
        self.spec = spec
        self.roots = roots
        self.max_resident = max_resident
        self.base_model_id = base_model_id
        self._records: dict[str, AdapterRecord] = {}
        self._resident: OrderedDict[tuple[str, str], AdapterVersion] = OrderedDict()
        self._lock = threading.RLock()
        self._load_ids = itertools.count(1)
        # metrics hook: ("evict" | "reload", "ok" | "error") for residency changes
        self.on_event: Callable[[str, str], None] = lambda event, result: None
        # shared-store hooks: before an admin change, and after it (action, name, version
        # for loads)
        self.before_change: Callable[[], None] = lambda: None
        self.after_change: Callable[[str, str, str | None], None] = lambda a, n, v: None

    # ------------------------------------------------------------------------------- admin
    def load(
        self,
        name: str,
        path: str,
        version: str | None = None,
        replace: bool = False,
        activate: bool = True,
        resident: bool = True,
    ) -> AdapterVersion:
        """Validate and load an adapter directory; blocking (call from a worker thread).
        `resident=False` validates it and leaves the weights on disk until a request needs
        them (a version another server loaded)."""
        self._check_name(name)
        self.before_change()
        if version is not None:
            self._check_name(version, "version")
        directory = confine(path, self.roots)
        loaded = read_adapter(directory, name, version, self.spec, next(self._load_ids))
        if version is None and not NAME_PATTERN.fullmatch(loaded.version):
            raise AdapterError(
                f"ragtune_adapter.json version {loaded.version!r} must match "
                f'{NAME_PATTERN.pattern}; fix the manifest or send "version"',
            )
        with self._lock:
            record = self._records.get(name)
            if record and loaded.version in record.versions and not replace:
                raise AdapterConflictError(
                    f'adapter {name}@{loaded.version} is already loaded; send "replace": true '
                    "to overwrite it, or load it under a new version",
                    param="lora_name",
                )
            entry = self._entry(name, loaded)
            record = self._records.setdefault(name, AdapterRecord())
            record.versions[entry.version] = entry
            if activate or record.active is None:
                self._set_active(record, entry.version)
            if resident:
                self._make_resident(entry)
            else:
                self._resident.pop((name, entry.version), None)
                entry.weights = None
        logger.info("loaded adapter %s@%s from %s", name, entry.version, directory)
        self.after_change("load", name, entry.version)
        return entry

    def unload(self, name: str, version: str | None = None) -> list[str]:
        """Forget a version (or every version); running requests keep their weights."""
        self.before_change()
        with self._lock:
            record = self._record(name)
            versions = [version] if version else list(record.versions)
            for v in versions:
                if v not in record.versions:
                    raise AdapterNotFoundError(f"adapter {name}@{v} is not loaded")
            for v in versions:
                record.versions.pop(v)
                self._resident.pop((name, v), None)
                record.history = [h for h in record.history if h != v]
                if record.active == v:
                    record.active = record.history.pop() if record.history else None
            if not record.versions:
                del self._records[name]
            elif record.active is None:
                record.active = next(reversed(record.versions))
        self.after_change("unload", name, None)
        return versions

    def activate(self, name: str, version: str) -> AdapterVersion:
        self.before_change()
        with self._lock:
            record = self._record(name)
            if version not in record.versions:
                raise AdapterNotFoundError(f"adapter {name}@{version} is not loaded")
            self._set_active(record, version)
            entry = record.versions[version]
        self.after_change("activate", name, None)
        return entry

    def rollback(self, name: str) -> AdapterVersion:
        self.before_change()
        with self._lock:
            record = self._record(name)
            if not record.history:
                raise AdapterError(
                    f"adapter {name} has no previous version to roll back to", param="lora_name"
                )
            previous = record.history.pop()
            record.active = previous
            entry = record.versions[previous]
        self.after_change("rollback", name, None)
        return entry

    def note_promotion(self, name: str, version: str, record: dict[str, Any], write: bool) -> bool:
        """Append a promotion decision to the version's manifest (`promotions`): in memory,
        and in its ragtune_adapter.json when `write` and the file exists. The file signature
        a reload checks is refreshed, so the note does not make the version unloadable.
        Returns whether the file was written."""
        from ragtune.fileio import atomic_write_text
        from ragtune.manifest import MANIFEST_NAME

        with self._lock:
            entry = self._record(name).versions.get(version)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {name}@{version} is not loaded")
            entry.manifest = {
                **entry.manifest,
                "promotions": [*entry.manifest.get("promotions", []), record],
            }
            path = entry.path / MANIFEST_NAME
            if not write or not path.is_file():
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
            data["promotions"] = [*data.get("promotions", []), record]
            atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))
            entry.files = file_signature(entry.path)
            return True

    # ------------------------------------------------------------------------- shared state
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """name -> active version, rollback history and each version's directory."""
        with self._lock:
            return {
                name: {
                    "active": record.active,
                    "history": list(record.history),
                    "versions": {v: str(e.path) for v, e in record.versions.items()},
                }
                for name, record in self._records.items()
            }

    def files_changed(self, name: str, version: str) -> bool:
        """Whether the version's files on disk are no longer those it was registered with
        (another server sharing the store replaced them, even with equal content)."""
        with self._lock:
            entry = self._records[name].versions[version]
        return file_signature(entry.path) != entry.files

    def set_versions(self, name: str, active: str, history: list[str]) -> None:
        """Take another server's active version and rollback history (versions known here)."""
        with self._lock:
            record = self._record(name)
            if active not in record.versions:
                raise AdapterNotFoundError(f"adapter {name}@{active} is not loaded")
            record.active = active
            record.history = [v for v in history if v in record.versions]

    def resident_ids(self) -> list[str]:
        """Model ids whose weights are in memory: `name@version`, and `name` when that
        version is the active one (what the affinity router matches requests against)."""
        with self._lock:
            ids = []
            for (name, version), _ in self._resident.items():
                ids.append(f"{name}@{version}")
                record = self._records.get(name)
                if record is not None and record.active == version:
                    ids.append(name)
            return ids

    # ------------------------------------------------------------------------------ serving
    def resolve(self, model: str) -> AdapterWeights:
        """Weights for `name` (its active version) or `name@version`; loads from disk if the
        version was evicted from memory. Blocking (disk); call from a worker thread."""
        name, at, version = model.partition("@")
        with self._lock:
            record = self._records.get(name)
            if record is None or (at and version not in record.versions):
                raise AdapterNotFoundError(model)
            entry = record.versions[version or record.active]
            entry.requests += 1
            entry.last_used = time.time()
            if entry.weights is not None:
                self._resident.move_to_end((entry.name, entry.version))
                return entry.weights
        # Reload outside the lock, checked again: the directory must still be inside the roots
        # and hold the very files first loaded (a version never changes behind its name).
        try:
            directory = confine(str(entry.path), self.roots)
            reloaded = read_adapter(
                directory, entry.name, entry.version, self.spec, next(self._load_ids)
            )
            if reloaded.files != entry.files:
                raise AdapterError("its files changed on disk since it was loaded")
        except AdapterError as exc:
            self.on_event("reload", "error")
            logger.error(
                "cannot reload adapter %s@%s from %s: %s",
                entry.name,
                entry.version,
                entry.path,
                exc,
            )
            raise AdapterUnavailableError(
                f"adapter {entry.name}@{entry.version} could not be reloaded from disk; "
                "an admin must load it again (see the server log)"
            ) from None
        self.on_event("reload", "ok")
        with self._lock:
            if entry.weights is None:
                entry.weights = reloaded.weights
                record = self._records.get(entry.name)
                if record is not None and record.versions.get(entry.version) is entry:
                    self._make_resident(entry)  # not when unloaded or replaced meanwhile
            return entry.weights

    def default_index(self, model: str) -> str | None:
        """The retrieval index an adapter's manifest names for `rag: true`, if any."""
        name, _, version = model.partition("@")
        with self._lock:
            record = self._records.get(name)
            entry = record and record.versions.get(version or record.active)
            return entry.manifest.get("default_index") if entry else None

    def model_ids(self) -> list[str]:
        with self._lock:
            ids = []
            for name, record in self._records.items():
                ids.append(name)
                ids.extend(f"{name}@{v}" for v in record.versions)
            return ids

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": name,
                    "active_version": record.active,
                    "previous_versions": list(record.history),
                    "versions": [
                        {
                            "version": e.version,
                            "path": str(e.path),
                            "rank": e.rank,
                            "target_modules": e.target_modules,
                            "resident": e.weights is not None,
                            "memory_bytes": e.nbytes if e.weights is not None else 0,
                            "loaded_at": e.loaded_at,
                            "last_used": e.last_used,
                            "requests": e.requests,
                            "manifest": e.manifest,
                        }
                        for e in record.versions.values()
                    ],
                }
                for name, record in self._records.items()
            ]

    # ----------------------------------------------------------------------------- helpers
    def _check_name(self, value: str, what: str = "lora_name") -> None:
        if not NAME_PATTERN.fullmatch(value or ""):
            raise AdapterError(f"{what} {value!r} must match {NAME_PATTERN.pattern}", param=what)
        if what == "lora_name" and value == self.base_model_id:
            raise AdapterError(f"{value!r} is the base model's id", param=what)

    def _record(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name} is not loaded")
        return record

    @staticmethod
    def _entry(name: str, loaded: LoadedAdapter) -> AdapterVersion:
        return AdapterVersion(
            name=name,
            version=loaded.version,
            path=loaded.path,
            rank=loaded.rank,
            target_modules=loaded.target_modules,
            manifest=loaded.manifest,
            weights=loaded.weights,
            nbytes=loaded.weights.nbytes,
            files=loaded.files,
        )

    @staticmethod
    def _set_active(record: AdapterRecord, version: str) -> None:
        if record.active is not None and record.active != version:
            record.history.append(record.active)
        record.active = version

    def _make_resident(self, entry: AdapterVersion) -> None:
        key = (entry.name, entry.version)
        self._resident[key] = entry
        self._resident.move_to_end(key)
        while len(self._resident) > self.max_resident:
            _, evicted = self._resident.popitem(last=False)
            evicted.weights = None  # back to disk; reloaded on the next request
            self.on_event("evict", "ok")
