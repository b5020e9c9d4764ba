"""Start a real `ragtune serve` process on a free loopback port (used by `ragtune bench`,
the benchmark scripts and the tests)."""

from __future__ import annotations

import os
import random
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


# Ports a process bound after a delay can count on: below the kernel's ephemeral range
# (32768-60999 by default, where every outgoing connection takes its local port) and clear of
# Ray's worker ports (10002-19999) and Serve's replica ports (30000-31000)
SETTLED_PORTS = range(20000, 30000)


def free_settled_port() -> int:
    """A free port (on every interface) that stays free while a Ray cluster starts.

    `free_port()` hands out an ephemeral port: free now, but during the seconds before Serve's
    HAProxy binds it the cluster opens hundreds of connections, and one of them may take it
    as its local port (HAProxy then fails to start: "Address already in use")."""
    for port in random.sample(SETTLED_PORTS, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SETTLED_PORTS.start}-{SETTLED_PORTS.stop - 1}")


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
