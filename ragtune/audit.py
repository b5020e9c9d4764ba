"""Append-only audit trail of admin actions (adapters and indexes, from HTTP or the CLI):
one JSON object per line, fsynced."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, key_id: str | None, action: str, result: str, **fields: object) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "key_id": key_id,
            "action": action,
            "adapter": None,  # always present, None when the action names none
            "index": None,
            "version": None,
            "result": result,
            **fields,
        }
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
