"""Keep every server's adapter registry in step through the shared store.

The store holds one document, `registry/state.json`: each adapter's versions (where their
files are in the store, and a digest of them), the active version and the rollback history,
with a revision number. A server:
- reads it at start, so a replica started (or restarted) later serves what the others do;
- reads it again before each admin change, applies the change, publishes the adapter's files
  (admin loads) and then the new document;
- polls it every `store.poll_s` and applies what another server changed: versions it lacks
  are registered with their weights left on disk until a request needs them (then loaded,
  and reported resident for the affinity router), versions gone are unloaded, the active
  version and history are taken over.

Writers are serialised by the caller (on Ray, the directory's admin lease: one at a time); two
servers changing the registry at the very same moment could lose one change, never corrupt
the document (one PUT, or write-then-rename).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from ragtune.store import Store
from server.adapters.errors import AdapterNotFoundError, AdapterUnavailableError
from server.adapters.registry import AdapterRegistry

logger = logging.getLogger(__name__)

STATE = "registry/state.json"


class SharedRegistry:
    def __init__(self, registry: AdapterRegistry, store: Store) -> None:
        self.registry = registry
        self.store = store
        self.revision = -1  # the store's revision this registry matches
        self._lock = threading.RLock()
        self._applying = False
        self._digests: dict[tuple[str, str], str] = {}  # the files each version was loaded from
        self._failed: dict[tuple[str, str], str] = {}  # versions that cannot load here
        registry.before_change = self._before_change
        registry.after_change = self._after_change

    # ----------------------------------------------------------------------- reading
    def changed(self) -> bool:
        """Cheap check (one small read) for a revision this server has not applied."""
        state = self.store.read_json(STATE)
        return state is not None and state.get("revision") != self.revision

    def pull(self) -> None:
        """Apply the store's state if it moved on. Blocking: loads run torch, so call it on
        a thread that ends (server/threads.py)."""
        with self._lock:
            state = self.store.read_json(STATE)
            if state is None or state.get("revision") == self.revision:
                return
            self._applying = True
            try:
                self._apply(state.get("adapters", {}))
            finally:
                self._applying = False
            self.revision = state["revision"]
            logger.info("adapter registry at store revision %d", self.revision)

    def _apply(self, wanted: dict[str, Any]) -> None:
        registry = self.registry
        local = registry.snapshot()
        for name, record in wanted.items():
            for version, info in record["versions"].items():
                key = (name, version)
                known = version in local.get(name, {}).get("versions", {})
                if (
                    known
                    and self._digests.get(key) == info["digest"]
                    and not registry.files_changed(name, version)
                ):
                    continue
                if self._failed.get(key) == info["digest"]:
                    continue
                try:
                    path = self.store.fetch_dir(info["path"])
                    registry.load(name, str(path), version, replace=True, activate=False,
                                  resident=False)  # fmt: skip
                except Exception as exc:  # one bad version must not stop the others
                    logger.error("cannot load adapter %s@%s from the store: %s", name, version, exc)
                    self._failed[key] = info["digest"]
                    continue
                self._digests[key] = info["digest"]
        for name, record in local.items():
            for version in record["versions"]:
                if version not in wanted.get(name, {}).get("versions", {}):
                    with contextlib.suppress(AdapterNotFoundError):
                        registry.unload(name, version)
                    self._digests.pop((name, version), None)
        for name, record in wanted.items():
            # its active version may have failed to load here (logged above)
            with contextlib.suppress(AdapterNotFoundError):
                registry.set_versions(name, record["active"], record["history"])

    # ------------------------------------------------------------------ admin hooks
    def _before_change(self) -> None:
        with self._lock:
            if self._applying:
                return
            try:
                self.pull()
            except Exception as exc:
                raise _unreachable(exc) from exc

    def _after_change(self, action: str, name: str, version: str | None) -> None:
        with self._lock:
            if self._applying:
                return
            try:
                if action == "load" and version is not None:
                    self._publish_version(name, version)
                self._write_state()
            except Exception as exc:
                self.revision = -1  # the next pull puts this server back on the store's state
                raise _unreachable(exc) from exc

    def _publish_version(self, name: str, version: str) -> None:
        path = Path(self.registry.snapshot()[name]["versions"][version])
        digest = self.store.publish_dir(store_path(name, version), path)
        self._digests[(name, version)] = digest
        self._failed.pop((name, version), None)

    def _write_state(self) -> None:
        adapters = {}
        for name, record in self.registry.snapshot().items():
            versions = {}
            for version in record["versions"]:
                if (name, version) not in self._digests:  # loaded before the store was attached
                    self._publish_version(name, version)
                versions[version] = {
                    "path": store_path(name, version),
                    "digest": self._digests[(name, version)],
                }
            adapters[name] = {
                "active": record["active"],
                "history": record["history"],
                "versions": versions,
            }
        current = self.store.read_json(STATE) or {}
        revision = max(int(current.get("revision", 0)), self.revision) + 1
        self.store.write_json(STATE, {"revision": revision, "adapters": adapters})
        self.revision = revision


def store_path(name: str, version: str) -> str:
    return f"adapters/{name}/{version}"


def _unreachable(exc: Exception) -> AdapterUnavailableError:
    logger.error("shared store: %s: %s", type(exc).__name__, exc)
    return AdapterUnavailableError(
        f"the shared adapter store could not be updated ({type(exc).__name__}); retry the call"
    )
