"""Autoscaling on Ray Serve (`serve.min_replicas` / `serve.max_replicas`): the options reach
Serve, a start count outside the bounds and bounds without `--replicas` are refused, and on a
local cluster of one replica (a tiny Llama, one CPU) that may grow to two, load above
`serve.target_ongoing_requests` adds the second replica, which then takes requests; when the
load ends it goes away again, and no request fails on the way up or down. Serve's delays and
window are shortened through the config (the same option names as Serve's)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from ragtune.config import Settings
from ragtune.cpu_share import cpu_share
from server.deploy.app import build
from server.deploy.process import ReplicatedServer, start_replicated
from tests.deploy.tiny_cluster import tiny_replica_env
from tests.engine.families import save_model_dir

pytestmark = pytest.mark.slow  # ~50 s: its own local Ray cluster

API_KEY, ADMIN_KEY = "scale-client", "scale-admin"
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BASE = "tiny-llama"
BODY = {"model": BASE, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 32}


def test_autoscaling_options_reach_serve_and_the_start_count_lies_within_bounds(
    monkeypatch,
) -> None:
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    bounds = {"min_replicas": 2, "max_replicas": 3}
    timing = {"upscale_delay_s": 1.5, "downscale_delay_s": 7, "look_back_period_s": 12}
    settings = Settings(serve={**bounds, **timing, "target_ongoing_requests": 3})
    for outside in (1, 4):
        with pytest.raises(ValueError, match=rf"{outside} replicas .* outside .* \(2\.\.3\)"):
            build(settings, replicas=outside)

    def autoscaling(replicas):  # Serve's own view of the deployment (its internals)
        return build(settings, replicas)._bound_deployment._deployment_config.autoscaling_config

    config = autoscaling(3)
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (2, 3, 3)
    assert config.target_ongoing_requests == 3
    assert {name: getattr(config, name) for name in timing} == timing
    assert autoscaling(None).initial_replicas == 2  # no start count: the lower bound


def test_ragtune_serve_refuses_ray_settings_without_replicas(tmp_path, capsys) -> None:
    """Autoscaling bounds or a Ray address without --replicas would serve from one process,
    ignoring them: refused instead."""
    from ragtune.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("serve:\n  min_replicas: 1\n  max_replicas: 2\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "--replicas N" in capsys.readouterr().err
    assert main(["serve", "--ray-address", "auto"]) == 2
    assert "--ray-address (serve.ray_address) names a Ray cluster" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> ReplicatedServer:
    if cpu_share().cpus < 2:
        pytest.skip("two one-CPU replicas need two CPUs")
    root = tmp_path_factory.mktemp("autoscaling")
    save_model_dir("llama", root / "model")
    env = {
        **tiny_replica_env(root, API_KEY, ADMIN_KEY, BASE),
        "RAGTUNE_SERVE__MIN_REPLICAS": "1",
        "RAGTUNE_SERVE__MAX_REPLICAS": "2",
        "RAGTUNE_SERVE__TARGET_ONGOING_REQUESTS": "1",
        "RAGTUNE_SERVE__UPSCALE_DELAY_S": "0",
        "RAGTUNE_SERVE__DOWNSCALE_DELAY_S": "2",
        "RAGTUNE_SERVE__LOOK_BACK_PERIOD_S": "11",  # more than Serve's 10 s between reports
    }
    server = start_replicated(env, root / "serve.log", replicas=1)
    yield server
    assert server.stop() == 0, server.log()[-4000:]


def listing(server: ReplicatedServer) -> list[dict]:
    response = httpx.get(f"{server.v1}/replicas", headers=ADMIN, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def ready_ids(server: ReplicatedServer) -> set[str]:
    return {entry["id"] for entry in listing(server) if entry["ready"]}


async def load_until(server: ReplicatedServer, concurrency: int, done) -> list[httpx.Response]:
    """`concurrency` clients posting back to back until `done()` holds (checked each second)."""
    responses: list[httpx.Response] = []
    stop = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            responses.append(
                await http.post(f"{server.v1}/chat/completions", json=BODY, headers=CLIENT)
            )

    async def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not await asyncio.to_thread(done):
            await asyncio.sleep(1)
        stop.set()

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(watch(), *(client(http) for _ in range(concurrency)))
    return responses


def test_load_adds_a_replica_that_serves(cluster: ReplicatedServer) -> None:
    assert len(ready_ids(cluster)) == 1
    grown_at: list[float] = []

    def two_serving() -> bool:
        if len(ready_ids(cluster)) < 2:
            return False
        grown_at.append(time.monotonic())
        return time.monotonic() - grown_at[0] > 5  # then 5 s more load over both

    responses = asyncio.run(load_until(cluster, 6, two_serving))
    assert grown_at, f"no second replica under load:\n{cluster.log()[-4000:]}"
    assert [r.status_code for r in responses if r.status_code != 200] == []
    served = {r.headers["x-ragtune-replica"] for r in responses}
    assert served == ready_ids(cluster) and len(served) == 2


def test_the_extra_replica_goes_when_the_load_ends(cluster: ReplicatedServer) -> None:
    """Requests one at a time stay below the target of 1 in flight: back to one replica,
    and none of the requests sent meanwhile fails. The leaving replica is listed unready
    while it drains, then leaves the listing."""
    if len(ready_ids(cluster)) < 2:
        pytest.skip("runs after test_load_adds_a_replica_that_serves, on its two replicas")
    responses = asyncio.run(load_until(cluster, 1, lambda: len(listing(cluster)) == 1))
    entries = listing(cluster)
    assert len(entries) == 1 and entries[0]["ready"], (entries, cluster.log()[-4000:])
    assert responses and [r.status_code for r in responses if r.status_code != 200] == []
