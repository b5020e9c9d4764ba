"""Fault fixtures: a real `ragtune serve` that keeps at most two adapter versions in memory
(so eviction is easy to reach), and real PEFT adapters under its adapter root. Tests copy an
adapter before damaging it, so these stay intact."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ragtune.launcher import RunningServer, start_server
from ragtune.random_adapter import ATTENTION, MLP, make_adapter
from tests.conftest import API_KEY, SERVER_ENV

FAULT_ADAPTERS = {"one": (8, ATTENTION, 11), "two": (4, MLP, 12)}  # name -> rank, targets, seed


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-adapters")
    for name, (rank, targets, seed) in FAULT_ADAPTERS.items():
        make_adapter(root / name, rank, targets, seed, scale=0.5)
    return root


@pytest.fixture(scope="session")
def fault_server(
    tmp_path_factory: pytest.TempPathFactory, fault_root: Path
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("fault-server") / "server.log"
    env = {
        **SERVER_ENV,
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(fault_root)]),
        "RAGTUNE_AUDIT_LOG": str(log.parent / "audit.log"),
        "RAGTUNE_ADAPTERS__MAX_CPU_LORAS": "2",
    }
    running = start_server(env, log)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def fault_http(fault_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_server.base_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def fault_client(fault_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fault_server.v1, api_key=API_KEY, max_retries=0, timeout=120)
