"""`ragtune adapters promote NAME@VERSION --gate QA.jsonl`: gated promotion on a running
server.

It talks to the server (admin key) rather than to the store: the active version is the
server's state (in memory, or the shared store's registry that every server follows), both
versions must be loaded there to be benchmarked as `name@version`, and the decision lands
through one audited admin call (`POST /v1/adapters/{name}/promote`), which activates an
accepted version on every server sharing the store and promotes a canary of it.

Exit codes: 0 promoted, 3 refused (the active version is untouched), 1 the server or a
benchmark failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REFUSED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ragtune adapters promote` to the `ragtune` parser."""
    parser = subparsers.add_parser("adapters", help="Adapter versions on a running server.")
    sub = parser.add_subparsers(dest="adapters_command", required=True)
    promote = sub.add_parser(
        "promote",
        help="Benchmark NAME@VERSION against the active version; activate it only if it is "
        "not worse.",
        description="Both versions answer --gate's questions on the server (the bench's ft "
        "arm), the runs are compared paired per question, and VERSION is activated only if "
        "the 95% interval of candidate - active on --metric has its lower end >= "
        "-MIN_DELTA. The decision and the numbers go to the audit log and the version's "
        "manifest. Exit 0 promoted, 3 refused, 1 failed, 2 bad input.",
    )
    promote.add_argument("target", metavar="NAME@VERSION", help="the candidate version")
    promote.add_argument("--gate", type=Path, required=True, help="QA JSONL (bench format)")
    promote.add_argument(
        "--min-delta",
        type=float,
        default=0.0,
        help="how much worse (in the metric's units) the candidate may be; default 0",
    )
    promote.add_argument(
        "--metric",
        default="auto",
        help="bench metric to judge on (default auto: likelihood accuracy, else reference "
        "log-lik / byte, label accuracy, keyword hit, token F1)",
    )
    promote.add_argument("--url", help="the server's /v1 URL (default: server.host/port)")
    promote.add_argument("--admin-key", help="admin key (default: first of $RAGTUNE_ADMIN_KEYS)")
    promote.add_argument("--config", help="YAML config (for the default --url)")
    promote.add_argument("--out", type=Path, help="bench reports (default: $RAGTUNE_HOME/gates)")
    promote.add_argument("--limit", type=int, help="only the first N questions")
    promote.add_argument("--seed", type=int, default=0)
    promote.add_argument("--max-tokens", type=int, default=32)
    promote.add_argument("--concurrency", type=int, default=8)
    promote.add_argument("--no-progress", action="store_true")
    promote.set_defaults(handler=run_promote)


def _admin_key(given: str | None) -> str:
    if given:
        return given
    keys = [k.strip() for k in os.environ.get("RAGTUNE_ADMIN_KEYS", "").split(",") if k.strip()]
    if not keys:
        raise ValueError("give --admin-key (or set RAGTUNE_ADMIN_KEYS)")
    return keys[0]


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    from ragtune.config import load_settings

    server = load_settings(args.config).server
    return f"http://{server.host}:{server.port}/v1"


def admin_call(
    method: str, url: str, key: str, body: dict[str, Any] | None = None, timeout: float = 120
) -> Any:
    """One admin request; RuntimeError naming the status and body unless it is a 200."""
    import httpx

    response = httpx.request(
        method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    )
    if response.status_code != 200:
        raise RuntimeError(f"{method} {url}: {response.status_code} {response.text}")
    return response.json()


def run_promote(args: argparse.Namespace) -> int:
    import httpx
    import openai

    name, at, version = args.target.partition("@")
    if not at or not name or not version:
        raise ValueError(f"give the candidate as NAME@VERSION, not {args.target!r}")
    for noisy in ("httpx", "faiss.loader", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        outcome = gate_and_promote(
            name,
            version,
            args.gate,
            url=_url(args),
            key=_admin_key(args.admin_key),
            out=args.out,
            metric=args.metric,
            min_delta=args.min_delta,
            limit=args.limit,
            seed=args.seed,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            progress=not args.no_progress,
        )
    except (RuntimeError, httpx.HTTPError, openai.APIError) as exc:
        print(f"ragtune: error: {exc}", file=sys.stderr)
        return 1
    print(describe_promotion(outcome))
    print(f"reports: {outcome['out']}", file=sys.stderr)
    return 0 if outcome["accepted"] else REFUSED


def gate_and_promote(
    name: str,
    version: str,
    dataset: Path,
    *,
    url: str,
    key: str,
    out: Path | None = None,
    metric: str = "auto",
    min_delta: float = 0.0,
    limit: int | None = None,
    seed: int = 0,
    max_tokens: int = 32,
    concurrency: int = 8,
    progress: bool = True,
    requested_by: str | None = None,
) -> dict[str, Any]:
    """Gate NAME@VERSION against the server's active version and record the decision
    through `POST /v1/adapters/{name}/promote` (which activates an accepted version).

    Returns {accepted, decision, name, version, active, gate, result, out}. Raises
    ValueError for bad input (not loaded, already active, ...), RuntimeError, httpx or
    openai errors when the server or a benchmark run fails. Also used by `ragtune retrain`.
    """
    from evaluation.gate import GateOptions, run_gate
    from ragtune.config import default_home

    if not dataset.is_file():
        raise FileNotFoundError(f"--gate {dataset}: no such file")
    if min_delta < 0:
        raise ValueError("--min-delta must be >= 0")
    url = url.rstrip("/")
    listed = admin_call("GET", f"{url}/adapters", key)["data"]
    found = next((a for a in listed if a["name"] == name), None)
    if found is None:
        raise ValueError(f"adapter {name} is not loaded on {url}")
    if version not in {v["version"] for v in found["versions"]}:
        raise ValueError(f"{name}@{version} is not loaded on {url}; load it first")
    active = found["active_version"]
    if version == active:
        raise ValueError(f"{name}@{version} is already the active version")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = out or default_home() / "gates" / name / f"{version}-vs-{active}-{stamp}"
    gate = run_gate(
        GateOptions(
            url=url,
            api_key=key,
            adapter=name,
            active=active,
            candidate=version,
            dataset=dataset,
            out=out,
            metric=metric,
            min_delta=min_delta,
            limit=limit,
            seed=seed,
            max_tokens=max_tokens,
            concurrency=concurrency,
            progress=progress,
        )
    )
    accepted = gate.pop("accepted")
    result = admin_call(
        "POST",
        f"{url}/adapters/{name}/promote",
        key,
        {
            "version": version,
            "accepted": accepted,
            "gate": gate,
            "requested_by": requested_by or f"cli:{getpass.getuser()}",
        },
    )
    return {
        "accepted": accepted,
        "decision": result["decision"],
        "name": name,
        "version": version,
        "active": active,
        "active_now": result["active_version"],
        "min_delta": min_delta,
        "gate": gate,
        "out": out,
    }


def describe_promotion(outcome: dict[str, Any]) -> str:
    """One line: the decision and the paired difference with its interval."""
    gate = outcome["gate"]
    paired = gate["paired"] or {}
    return (
        f"{outcome['decision']}: {outcome['name']}@{outcome['version']} vs "
        f"{outcome['active']} on {gate['metric']} ({gate['questions']} questions): candidate "
        f"- active = {_num(paired.get('diff'))} [{_num(paired.get('low'))}, "
        f"{_num(paired.get('high'))}], min-delta {outcome['min_delta']}; active version now "
        f"{outcome['active_now']}"
    )


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"
