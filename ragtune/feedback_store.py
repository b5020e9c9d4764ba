"""Feedback on disk, under $RAGTUNE_HOME/feedback/: what the server writes and
`ragtune prepare --from-feedback` reads.

Two kinds of record, one JSON object per line, in one file per kind and UTC day
(`ratings-2026-12-05.jsonl`, `conversations-2026-12-05.jsonl`), each line appended with a
single fsynced write (ragtune/fileio.py `append_line`):

- `ratings`: {time, id, rating, model, adapter, version, choice}, plus `correction` and
  `comment` only when `feedback.store_conversations` is on;
- `conversations` (only when `feedback.store_conversations` is on): {time, id, model,
  adapter, version, messages, answers}.

Callers mask PII before they append; this module stores what it is given. Retention is by
day: files of days older than `retention_days` are deleted, and readers skip records older
than that, so an expired record is never used even before its file goes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from ragtune.fileio import append_line

logger = logging.getLogger(__name__)

Kind = Literal["ratings", "conversations"]
KINDS: tuple[Kind, ...] = ("ratings", "conversations")
_FILE = re.compile(r"^(ratings|conversations)-(\d{4}-\d{2}-\d{2})\.jsonl$")


def feedback_dir(home: Path) -> Path:
    return home / "feedback"


class FeedbackStore:
    def __init__(self, directory: Path, retention_days: int) -> None:
        self.directory = directory
        self.retention_days = retention_days
        self._lock = threading.Lock()
        self._pruned_on: str | None = None  # the UTC day the last prune ran

    # ---------------------------------------------------------------------------- writing
    def append(self, kind: Kind, record: dict[str, Any], now: datetime | None = None) -> None:
        """Add `time` (UTC, ISO) and append the record to today's file of its kind."""
        now = now or datetime.now(timezone.utc)
        day = now.strftime("%Y-%m-%d")
        line = json.dumps(
            {"time": now.isoformat(timespec="milliseconds"), **record}, ensure_ascii=False
        )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        append_line(self.directory / f"{kind}-{day}.jsonl", line)
        with self._lock:
            due = self._pruned_on != day
            self._pruned_on = day
        if due:  # once a day per process is enough for day-sized files
            self.prune(now)

    def prune(self, now: datetime | None = None) -> list[Path]:
        """Delete the files of days wholly past the retention; return them."""
        cutoff = self._cutoff(now).date()
        removed = []
        for path, day in self._files():
            if day < cutoff:
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            logger.info("feedback retention: removed %d expired file(s)", len(removed))
        return removed

    # ---------------------------------------------------------------------------- reading
    def read(self, kind: Kind, now: datetime | None = None) -> Iterator[dict[str, Any]]:
        """Records of `kind`, oldest file first, without expired or torn ones."""
        cutoff = self._cutoff(now)
        for path, day in self._files(kind):
            if day < cutoff.date():
                continue
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        when = datetime.fromisoformat(record["time"])
                    except (ValueError, KeyError, TypeError):
                        logger.warning("skipping unreadable line %d of %s", number, path)
                        continue
                    if when >= cutoff:
                        yield record

    def _cutoff(self, now: datetime | None) -> datetime:
        return (now or datetime.now(timezone.utc)) - timedelta(days=self.retention_days)

    def _files(self, kind: Kind | None = None) -> list[tuple[Path, Any]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _FILE.match(path.name)
            if match and (kind is None or match.group(1) == kind):
                day = datetime.strptime(match.group(2), "%Y-%m-%d").date()
                found.append((path, day))
        return sorted(found, key=lambda item: (item[1], item[0].name))
