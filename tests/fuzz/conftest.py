"""A dedicated real server for the schemathesis fuzz run (its admin calls are destructive), the
schema loaded from that server's /openapi.json, and a count of the cases generated.

RAGTUNE_FUZZ_EXAMPLES (fuzzing-phase examples per operation), RAGTUNE_FUZZ_SEED and
RAGTUNE_FUZZ_MIN_CASES (fail the session if fewer cases ran; `make fuzz` sets it) tune a run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st

from ragtune.launcher import RunningServer, start_server
from ragtune.random_adapter import ATTENTION, make_adapter
from tests.fuzz.strategies import (
    ADAPTER,
    FUZZ_ADMIN_KEY,
    FUZZ_API_KEY,
    INDEX,
    SPARE_ADAPTER,
    real_values,
    with_key,
    with_real_values,
)

SEED = int(os.environ.get("RAGTUNE_FUZZ_SEED", "20240611"))
EXAMPLES = int(os.environ.get("RAGTUNE_FUZZ_EXAMPLES", "10"))
MIN_CASES = int(os.environ.get("RAGTUNE_FUZZ_MIN_CASES", "0"))

CASES = pytest.StashKey[Counter]()


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's from_fixture reads `node._nodeid`, which pytest 9.2 no longer has
    (it keeps `_id`); give it the attribute it renames per operation for its reports."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="session")
def fuzz_cases(request: pytest.FixtureRequest) -> Counter:
    """Responses per (operation, phase, status); reported at the end of the session."""
    return request.config.stash.setdefault(CASES, Counter())


@pytest.fixture(scope="session")
def fuzz_adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real PEFT adapters: one preloaded, one only reachable through load_lora_adapter."""
    root = tmp_path_factory.mktemp("fuzz-adapters")
    make_adapter(root / ADAPTER, 4, ATTENTION, seed=7)
    make_adapter(root / SPARE_ADAPTER, 4, ATTENTION, seed=8)
    return root


@pytest.fixture(scope="session")
def fuzz_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents under the server's retrieval.source_roots (what admin index builds read)."""
    docs = tmp_path_factory.mktemp("fuzz-docs")
    (docs / "valves.md").write_text("# Valves\n\nTighten the valve to 42 newton-metres.\n")
    (docs / "holidays.txt").write_text("The office is closed on the first Monday of August.\n")
    return docs


@pytest.fixture(scope="session")
def fuzz_index_root(tmp_path_factory: pytest.TempPathFactory, fuzz_docs: Path) -> Path:
    """An index root with one small real index, the server's default for `rag: true`."""
    from retrieval.store import IndexStore

    root = tmp_path_factory.mktemp("fuzz-indexes")
    IndexStore(root).build(INDEX, [fuzz_docs])
    return root


@pytest.fixture(scope="session")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory,
    fuzz_adapter_root: Path,
    fuzz_index_root: Path,
    fuzz_docs: Path,
) -> Iterator[RunningServer]:
    """Tiny limits: every request stays cheap and every limit is reachable by the fuzzer."""
    workdir = tmp_path_factory.mktemp("fuzz-server")
    env = {
        "RAGTUNE_API_KEYS": FUZZ_API_KEY,
        "RAGTUNE_ADMIN_KEYS": FUZZ_ADMIN_KEY,
        "RAGTUNE_LIMITS__MAX_NEW_TOKENS": "4",
        "RAGTUNE_LIMITS__MAX_PROMPT_TOKENS": "96",
        "RAGTUNE_LIMITS__MAX_BODY_BYTES": "16384",
        "RAGTUNE_SERVER__LOG_LEVEL": "warning",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(fuzz_adapter_root)]),
        "RAGTUNE_AUDIT_LOG": str(workdir / "audit.log"),
        "RAGTUNE_RETRIEVAL__ROOT": str(fuzz_index_root),
        "RAGTUNE_RETRIEVAL__DEFAULT_INDEX": INDEX,
        "RAGTUNE_RETRIEVAL__SOURCE_ROOTS": json.dumps([str(fuzz_docs)]),
    }
    args = ["--adapter", f"{ADAPTER}={fuzz_adapter_root / ADAPTER}"]
    running = start_server(env, workdir / "server.log", args)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def api_schema(
    fuzz_server: RunningServer, fuzz_adapter_root: Path, fuzz_docs: Path, fuzz_cases: Counter
) -> schemathesis.BaseSchema:
    """The served schema, seeded; hooks mix real values and keys into generated cases."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=config)

    def real(ctx: schemathesis.HookContext) -> dict[str, list[Any]]:
        return real_values(fuzz_adapter_root, fuzz_docs, ctx.operation.path)

    @schema.hook
    def flatmap_body(ctx: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
        return with_real_values(body, real(ctx))

    @schema.hook
    def flatmap_path_parameters(
        ctx: schemathesis.HookContext, params: dict[str, Any]
    ) -> st.SearchStrategy:
        return with_real_values(params, real(ctx))

    @schema.hook
    def flatmap_case(_: schemathesis.HookContext, case: schemathesis.Case) -> st.SearchStrategy:
        return with_key(case)

    @schema.hook
    def after_call(
        _: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response
    ) -> None:
        phase = case.meta.phase.name.value if case.meta else "explicit"
        fuzz_cases[case.operation.label, phase, response.status_code] += 1

    return schema


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    cases = config.stash.get(CASES, None)
    if cases is None:
        return
    statuses: dict[str, Counter] = {}
    phases: Counter = Counter()
    for (label, phase, status), count in cases.items():
        statuses.setdefault(label, Counter())[status] += count
        phases[phase] += count
    terminalreporter.section("schemathesis fuzz")
    for label, spread in sorted(statuses.items()):
        detail = " ".join(f"{status}:{n}" for status, n in sorted(spread.items()))
        terminalreporter.write_line(f"{spread.total():6d}  {label:40s} {detail}")
    by_phase = ", ".join(f"{n} {phase}" for phase, n in sorted(phases.items()))
    terminalreporter.write_line(
        f"{cases.total()} cases ({by_phase}) over {len(statuses)} operations; "
        f"seed {SEED}, RAGTUNE_FUZZ_EXAMPLES={EXAMPLES}"
    )
    if cases.total() < MIN_CASES:
        terminalreporter.write_line(f"FAILED: fewer than RAGTUNE_FUZZ_MIN_CASES={MIN_CASES}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`make fuzz` promises a minimum number of cases; fewer is a failure, not a quiet pass."""
    cases = session.config.stash.get(CASES, None)
    if cases is not None and cases.total() < MIN_CASES and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
