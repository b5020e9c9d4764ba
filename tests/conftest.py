"""Shared fixtures: one real server on the bundled model for the whole test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.launcher import RunningServer, start_server
from ragtune.random_adapter import ATTENTION, MLP, make_adapter

API_KEY = "test-client-key"
ADMIN_KEY = "test-admin-key"
BASE_MODEL = "smollm2-135m-instruct"

# Small limits so every limit can be hit cheaply in tests.
SERVER_ENV = {
    "RAGTUNE_API_KEYS": API_KEY,
    "RAGTUNE_ADMIN_KEYS": ADMIN_KEY,
    "RAGTUNE_LIMITS__MAX_PROMPT_TOKENS": "512",
    "RAGTUNE_LIMITS__MAX_NEW_TOKENS": "128",
    "RAGTUNE_LIMITS__MAX_BODY_BYTES": "65536",
    "RAGTUNE_SERVER__LOG_LEVEL": "warning",
}


ADAPTERS = {  # name -> (rank, target modules, seed)
    "alpha": (8, ATTENTION, 1),
    "beta": (16, ATTENTION + MLP, 2),
    "gamma": (4, MLP, 3),
}


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A configured adapter root holding real PEFT adapters made from the bundled model."""
    root = tmp_path_factory.mktemp("adapters")
    for name, (rank, targets, seed) in ADAPTERS.items():
        make_adapter(root / name, rank, targets, seed)
    return root


@pytest.fixture(scope="session")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.log"


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test server's retrieval.root; tests build indexes here with IndexStore."""
    return tmp_path_factory.mktemp("indexes")


@pytest.fixture(scope="session")
def document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test server's retrieval.source_roots: documents the admin index API may read."""
    return tmp_path_factory.mktemp("documents")


@pytest.fixture(scope="session")
def file_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Keys that exist only as digests in the server's key file: scope -> plaintext key."""
    from server.keys import create_key

    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys = {scope: create_key(path, scope, f"test-{scope}") for scope in ("client", "admin")}
    keys["file"] = str(path)
    return keys


@pytest.fixture(scope="session")
def server(
    tmp_path_factory,
    adapter_root: Path,
    audit_log: Path,
    index_root: Path,
    document_root: Path,
    file_keys: dict[str, str],
) -> RunningServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **SERVER_ENV,
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapter_root)]),
        "RAGTUNE_AUDIT_LOG": str(audit_log),
        "RAGTUNE_RETRIEVAL__ROOT": str(index_root),
        "RAGTUNE_RETRIEVAL__SOURCE_ROOTS": json.dumps([str(document_root)]),
        "RAGTUNE_API_KEY_FILE": file_keys["file"],
    }
    args = [arg for name in ADAPTERS for arg in ("--adapter", f"{name}={adapter_root / name}")]
    running = start_server(env, log, args)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: RunningServer):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server: RunningServer):
    import openai

    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)
