"""deploy/grafana/ragtune.json reads only metrics the server exports: every PromQL expression
in it (panels and template variables) is lexed, its metric names taken out, and each must be
a sample name a real server's /metrics page declares (the session server on the bundled
model; a family with no samples yet still has its `# TYPE` line, from which the sample names
of its type follow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ragtune.json"
# what a family of each type exposes, as suffixes of its name (prometheus_client's text format)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "le",
}  # fmt: skip
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed): strings, label
    matchers, ranges and grouping lists are dropped; an identifier that is not a function
    call, keyword or number is a metric name. Brackets must balance."""
    assert _balanced(expr), f"unbalanced brackets in {expr!r}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "1", text)  # $__rate_interval, ${adapter}
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    # grouping clauses go whole: `sum by (le) (x)` reads as the call `sum (x)`
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in IDENT.finditer(text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if word in KEYWORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d", text[match.start() - 1 : match.start()] or " "):
            continue  # the tail of a number such as 1e3 or 5m
        names.add(word)
    return names


def _balanced(expr: str) -> bool:
    depth = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            depth.append(char)
        elif char in pairs and (not depth or depth.pop() != pairs[char]):
            return False
    return not depth


def expressions(dashboard: dict) -> list[str]:
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            found.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query" and query:
            # label_values(metric, label) -> its metric expression
            found.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return found


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, model) (rate(a_bucket{x=~"$v"}[$__rate_interval]))', {"a_bucket"}),
        ("x / ignoring (version) group_left sum by (adapter) (y)", {"x", "y"}),
        ('increase(c_total{r="down"}[1h]) > 1e3', {"c_total"}),
        ("up == 1 and on (job) absent(z_total)", {"up", "z_total"}),
    ],
)
def test_metric_names_are_lexed_out_of_promql(expr, names):
    assert metric_names(expr) == names


def test_every_dashboard_expression_names_an_exported_metric(server):
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    text = httpx.get(
        f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).text
    exported = exported_names(text)
    used: set[str] = set()
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} reads {sorted(missing)}, which /metrics does not export"
        used |= names
    # what an operator needs to see is all there
    for needed in (
        "ragtune_adapter_requests_total",  # traffic and errors per adapter version
        "ragtune_adapter_request_latency_seconds_bucket",
        "ragtune_feedback_total",  # down-ratings per version
        "ragtune_canary_fraction",
        "ragtune_canary_state",
        "ragtune_canary_rollbacks_total",
        "ragtune_sequences_waiting",  # queue depth
        "ragtune_tokens_total",  # tokens/s
    ):
        assert needed in used, f"the dashboard shows nothing of {needed}"
