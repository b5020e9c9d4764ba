"""Start a real `ragtune serve` process on a free loopback port (used by `ragtune bench`,
the benchmark scripts and the tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    env: dict[str, str],
    log_path: Path,
    args: list[str] | None = None,
    ready_timeout: float = 300,
    cwd: Path | None = None,
) -> RunningServer:
    port = free_port()
    full_env = {**os.environ, **env}
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ragtune.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *(args or []),
        ],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log()}")
