"""Run a child process up to an injected pause point, then kill -9 it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_when_paused(args: list[str], log: Path, at_pause: Callable[[], object]) -> object:
    """Start `python ARGS`; when it prints "paused", call `at_pause` (what to inspect while
    the child is frozen mid-write), then SIGKILL it. Returns what `at_pause` returned."""
    with open(log, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        try:
            assert child.stdout.readline() == "paused\n", log.read_text()
            seen = at_pause()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return seen
