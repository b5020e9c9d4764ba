"""A server attached to the shared store (`store.url`, and every Ray replica): its adapter
registry follows the store's (server/adapters/shared.py), its indexes too when the store is
remote (retrieval/mirror.py); a poller applies what other servers changed."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ragtune.config import Settings
from ragtune.store import local_root, open_store
from retrieval.mirror import IndexMirror
from server.adapters.registry import AdapterRegistry
from server.adapters.shared import SharedRegistry

logger = logging.getLogger(__name__)

CATCH_UP_INTERVAL_S = 0.2


def store_settings(settings: Settings) -> Settings:
    """Settings with indexes and adapters read from the store (a copy; unchanged when no
    store is set). A remote store's cache is local, so the usual roots point into it."""
    if settings.store.url is None:
        return settings
    local = local_root(settings.store.url, settings.home, settings.store.cache_dir)
    retrieval = settings.retrieval.model_copy(update={"root": local / "indexes"})
    roots = [*settings.adapters.roots, local / "adapters"]
    adapters = settings.adapters.model_copy(update={"roots": roots})
    return settings.model_copy(update={"retrieval": retrieval, "adapters": adapters})


class StoreSync:
    def __init__(self, settings: Settings, registry: AdapterRegistry) -> None:
        self.store = open_store(settings)
        self.poll_s = settings.store.poll_s
        self.registry = SharedRegistry(registry, self.store)
        self.mirror = IndexMirror(self.store) if self.store.remote else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._catch_up_lock = threading.Lock()
        self._last_catch_up = 0.0

    def pull(self) -> None:
        """Apply everything the store has that this server lacks (blocking)."""
        self.registry.pull()
        if self.mirror is not None:
            self.mirror.pull()

    def catch_up(self) -> None:
        """Pull now if the store moved on: a request naming an adapter that
        another server loaded a moment ago is served, not answered 404 until the next poll.
        At most one store read per CATCH_UP_INTERVAL_S, so unknown names cannot flood it."""
        with self._catch_up_lock:
            now = time.monotonic()
            if now - self._last_catch_up < CATCH_UP_INTERVAL_S:
                return  # one just ran (or is the one this call waited for)
            self._last_catch_up = now
            if self.registry.changed():
                self.pull()

    def attach_indexes(self, index_store: Any) -> None:
        """Publish this server's index writes (remote stores; local ones are shared as is)."""
        if self.mirror is not None and index_store is not None:
            index_store.on_change = self.mirror.push

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="ragtune-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        # Only the cheap revision checks run on this long-lived thread: loads run torch,
        # and a thread that ran torch keeps an OpenMP team that slows the engine
        # (server/threads.py), so each pull gets a thread that ends with it.
        while not self._stop.wait(self.poll_s):
            try:
                if self.registry.changed() or (self.mirror and self.mirror.changed()):
                    worker = threading.Thread(target=self._pull_logged, name="ragtune-pull")
                    worker.start()
                    worker.join()
            except Exception as exc:
                logger.warning("shared store: cannot check for changes: %s", exc)

    def _pull_logged(self) -> None:
        try:
            self.pull()
        except Exception:
            logger.exception("shared store: applying another server's change failed")
