"""The canary's routing decision, counters and thresholds (server/canary.py) without a model:
the split is exact per window, judgement waits for the minimum counts, a rollback is audited
once and sends traffic back, and a canary that cannot be resolved falls back to the active
version. The same paths over real HTTP are in test_canary.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.audit import AuditLog
from ragtune.config import CanaryConfig
from server.adapters.errors import AdapterNotFoundError, AdapterUnavailableError
from server.canary import CanaryRouter
from server.metrics import Metrics


def router(tmp_path: Path, **config) -> CanaryRouter:
    return CanaryRouter(CanaryConfig(**config), Metrics(), AuditLog(tmp_path / "audit.log"))


def audit(tmp_path: Path) -> list[dict]:
    path = tmp_path / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.75, 1.0])
def test_split_is_exact_in_every_window_of_ten(tmp_path, fraction):
    canaries = router(tmp_path)
    canaries.start("a", "v2", fraction, by="k")
    routed = [canaries.route("a") for _ in range(100)]
    assert routed.count("a@v2") == round(100 * fraction)
    for start in range(0, 100, 20):  # a window of 20 never strays more than one request
        assert abs(routed[start : start + 20].count("a@v2") - 20 * fraction) <= 1


def test_only_plain_names_of_the_canaried_adapter_are_split(tmp_path):
    canaries = router(tmp_path)
    canaries.start("a", "v2", 1.0, by=None)
    assert canaries.route("a") == "a@v2"
    assert canaries.route("a@v1") == "a@v1"  # a pinned version is never moved
    assert canaries.route("b") == "b"
    canaries.stop("a")
    assert canaries.route("a") == "a"
    with pytest.raises(AdapterNotFoundError):
        canaries.stop("a")  # nothing runs any more


def test_error_rate_is_judged_only_after_min_requests(tmp_path):
    canaries = router(tmp_path, min_requests=5, max_error_rate=0.2)
    canaries.start("a", "v2", 0.5, by=None)
    for _ in range(4):
        canaries.observe_response("a", "v2", ok=False, latency_s=0.1)
    assert canaries.running("a") is not None  # 4 of 4 failed, but 4 < min_requests
    canaries.observe_response("a", "v2", ok=False, latency_s=0.1)
    assert canaries.running("a") is None
    assert canaries.describe("a")["state"] == "rolled_back"
    assert canaries.describe("a")["reason"] == "error_rate"
    assert canaries.route("a") == "a"
    rollbacks = [e for e in audit(tmp_path) if e["action"] == "canary_rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["version"] == "v2" and rollbacks[0]["trigger"] == "automatic"
    assert rollbacks[0]["errors"] == 5 and rollbacks[0]["threshold"] == 0.2
    m = canaries.metrics
    assert sample(m, "ragtune_canary_rollbacks_total", {"adapter": "a", "reason": "error_rate"})
    assert sample(
        m, "ragtune_canary_state", {"adapter": "a", "ragtune_canary_state": "rolled_back"}
    )
    assert sample(m, "ragtune_canary_fraction", {"adapter": "a", "version": "v2"}) == 0
    assert (
        sample(
            m,
            "ragtune_adapter_requests_total",
            {"adapter": "a", "version": "v2", "outcome": "error"},
        )
        == 5
    )


def test_errors_of_the_active_version_do_not_roll_the_canary_back(tmp_path):
    canaries = router(tmp_path, min_requests=2, max_error_rate=0.0)
    canaries.start("a", "v2", 0.5, by=None)
    for _ in range(10):
        canaries.observe_response("a", "v1", ok=False, latency_s=0.1)
        canaries.observe_response("a", "v2", ok=True, latency_s=0.1)
    assert canaries.running("a") is not None
    assert canaries.describe("a")["versions"]["v1"]["errors"] == 10


def test_down_ratings_past_the_threshold_roll_back(tmp_path):
    canaries = router(tmp_path, min_ratings=4, max_down_rate=0.5)
    canaries.start("a", "v2", 0.3, by=None)
    for rating in ("down", "up", "down", "down"):  # 3 of 4 down > 0.5
        canaries.observe_rating("a", "v2", rating)
    assert canaries.describe("a")["state"] == "rolled_back"
    assert canaries.describe("a")["reason"] == "down_rate"
    canaries.observe_rating("a", "v2", "down")  # after the end: nothing more happens
    assert len([e for e in audit(tmp_path) if e["action"] == "canary_rollback"]) == 1


def test_activating_the_canary_version_promotes_it(tmp_path):
    canaries = router(tmp_path)
    canaries.start("a", "v2", 0.3, by=None)
    assert canaries.promoted("a", "v3") is None  # another version: the canary goes on
    assert canaries.promoted("a", "v2").state == "promoted"
    assert canaries.running("a") is None


def test_an_unresolvable_canary_counts_an_error_and_the_active_version_serves(tmp_path):
    canaries = router(tmp_path, min_requests=3, max_error_rate=0.5)
    canaries.start("a", "v2", 1.0, by=None)
    asked = []

    def resolve(model: str) -> str:
        asked.append(model)
        if model == "a@v2":
            raise AdapterUnavailableError("its files changed on disk")
        return f"weights of {model}"

    served = [canaries.resolve("a", resolve) for _ in range(3)]
    assert served == ["weights of a"] * 3  # every request answered
    assert asked == ["a@v2", "a"] * 3
    assert canaries.describe("a")["state"] == "rolled_back"
    assert canaries.resolve("a", resolve) == "weights of a"
    assert asked[-1] == "a"  # after the rollback the canary is not tried
