"""Start `ragtune serve --replicas N` as a subprocess on a free loopback port and wait until
every replica is ready (tests and bench/replicas.py; the single-process counterpart is
ragtune/launcher.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ragtune.launcher import free_settled_port


@dataclass
class ReplicatedServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 150) -> int:
        """SIGTERM (drain, take the application and the local cluster down), then kill."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_replicated(
    env: dict[str, str],
    log_path: Path,
    replicas: int,
    args: list[str] | None = None,
    ready_timeout: float = 600,
) -> ReplicatedServer:
    port = free_settled_port()
    command = [sys.executable, "-m", "ragtune.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--replicas", str(replicas), *(args or [])]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    server = ReplicatedServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-6000:]}")
        try:
            ready = httpx.get(f"{server.base_url}/ready", timeout=2)
            if ready.status_code == 200 and ready.json().get("replicas") == replicas:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    tail = server.log()[-6000:]
    raise RuntimeError(f"{replicas} replicas not ready after {ready_timeout}s:\n{tail}")
