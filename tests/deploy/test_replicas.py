"""`ragtune serve --replicas 2` on one local Ray cluster for the whole module: a tiny Llama,
CPU replicas of one CPU each behind Serve's HAProxy, the shared store on a local S3 server
(moto). The official `openai` client works unchanged; admin changes, even sent at once to
different replicas, reach every replica; requests for an adapter
stick to replicas that hold it (`X-Ragtune-Replica`); an index built on one replica is served
through S3; a SIGKILLed replica costs no request that starts after the kill."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("s3fs")

from server.deploy.process import ReplicatedServer, start_replicated
from server.deploy.router import STATS_PERIOD_S
from tests.deploy.tiny_cluster import tiny_replica_env
from tests.engine.families import peft_adapter, save_model_dir

API_KEY, ADMIN_KEY = "replica-client", "replica-admin"
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BASE = "tiny-llama"
ADAPTERS = ["ad0", "ad1", "ad2", "ad3"]
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str):
    import s3fs

    os.environ.update(AWS)  # the replicas inherit it (a local cluster's workers do)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = f"replicas-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return fs, name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint: str, bucket) -> ReplicatedServer:
    root = tmp_path_factory.mktemp("replicas")
    model, _ = save_model_dir("llama", root / "model")
    for seed, name in enumerate(ADAPTERS, start=1):
        peft_adapter(model, "llama", root / "adapters" / name, rank=4, seed=seed)
    documents = root / "home" / "documents"
    documents.mkdir(parents=True)
    (documents / "manual.md").write_text(
        "# Pallets\n\nEvery pallet is weighed at dock 7 before it leaves the warehouse.\n"
    )
    env = {
        **AWS,
        **tiny_replica_env(root, API_KEY, ADMIN_KEY, BASE),
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root / "adapters")]),
        "RAGTUNE_STORE__URL": f"s3://{bucket[1]}/store",
        "RAGTUNE_STORE__OPTIONS": json.dumps({"endpoint_url": s3_endpoint}),
    }
    server = start_replicated(env, root / "serve.log", replicas=2)
    server.adapter_root = root / "adapters"
    yield server
    assert server.stop() == 0, server.log()[-4000:]


def replicas(server: ReplicatedServer) -> list[dict]:
    response = httpx.get(f"{server.v1}/replicas", headers=ADMIN, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def wait_for(condition, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    return None


def chat_body(model: str, stream: bool = False) -> dict:
    messages = [{"role": "user", "content": "Where are pallets weighed?"}]
    return {"model": model, "messages": messages, "max_tokens": 8, "stream": stream}


def test_ready_counts_replicas_the_router_sends_to(cluster: ReplicatedServer) -> None:
    """First on the fresh cluster: `/ready` said 2 (start_replicated waits for it), so base
    requests reach both replicas at once. A replica reports itself a moment before Serve
    tells the route chooser's router of it; counted from reports alone, adapters loaded
    right after start all went to one replica."""
    served = set()
    with httpx.Client(timeout=60) as http:
        for _ in range(16):  # ties go either way: 16 on one replica is 2 in 65,536 by chance
            response = http.post(
                f"{cluster.v1}/chat/completions", json=chat_body(BASE), headers=CLIENT
            )
            assert response.status_code == 200, response.text
            served.add(response.headers["x-ragtune-replica"])
    assert served == {r["id"] for r in replicas(cluster) if r["ready"]}
    assert len(served) == 2, served


def serving_haproxy_configs(port: int) -> list[Path]:
    """The configs of the HAProxy processes bound to `port`, as their command lines name them."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "-f" in args[:-1] and Path(args[0]).name == "haproxy":
                config = Path(args[args.index("-f") + 1])
                if f"bind 127.0.0.1:{port}\n" in config.read_text():
                    found.append(config)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_haproxy_runs_the_config_rewritten_for_openai_errors(cluster: ReplicatedServer) -> None:
    """`ragtune serve --replicas` starts Serve's HAProxy through `ragtune-haproxy`
    (tests/deploy/test_haproxy_errors.py: what the rewritten config answers)."""
    port = int(cluster.base_url.rsplit(":", 1)[1])
    configs = serving_haproxy_configs(port)
    assert configs and all("route_unavailable" in c.read_text() for c in configs)


def test_openai_client_unchanged(cluster: ReplicatedServer) -> None:
    import openai

    client = openai.OpenAI(base_url=cluster.v1, api_key=API_KEY)
    assert BASE in [m.id for m in client.models.list().data]
    raw = client.chat.completions.with_raw_response.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert raw.headers["x-ragtune-replica"] in {r["id"] for r in replicas(cluster)}
    assert raw.parse().usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens > 0
    assert client.completions.create(model=BASE, prompt="Once", max_tokens=4).choices[0].text
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(
            model="no-such-adapter", messages=[{"role": "user", "content": "hi"}]
        )
    assert error.value.body["code"] == "model_not_found"


def test_cluster_routes_health_metrics_and_replicas_scope(cluster: ReplicatedServer) -> None:
    assert httpx.get(f"{cluster.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{cluster.base_url}/ready").json()
    assert ready["replicas"] == 2
    assert httpx.get(f"{cluster.v1}/replicas", headers=CLIENT).status_code == 403
    assert httpx.get(f"{cluster.v1}/replicas").status_code == 401
    entries = replicas(cluster)
    assert len(entries) == 2 and all(e["pid"] > 0 and e["host"] for e in entries)
    assert [e["threads"] for e in entries] == [1, 1]  # model.threads auto: num_cpus 1 each

    def labelled() -> str | None:
        text = httpx.get(f"{cluster.base_url}/metrics", headers=CLIENT).text
        return text if all(f'replica="{e["id"]}"' in text for e in entries) else None

    page = wait_for(labelled, timeout=5)
    assert page is not None and "ragtune_http_requests_total" in page
    big = {"model": BASE, "prompt": "x" * 2_000_000}
    assert httpx.post(f"{cluster.v1}/completions", json=big, headers=CLIENT).status_code == 413


def test_adapters_reach_every_replica_and_requests_follow_them(
    cluster: ReplicatedServer, bucket
) -> None:
    async def load_all() -> list[httpx.Response]:  # at once: HAProxy spreads them over both
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        f"{cluster.v1}/load_lora_adapter",
                        json={
                            "lora_name": name,
                            "lora_path": str(cluster.adapter_root / name),
                            "version": "v1",
                        },
                        headers=ADMIN,
                    )
                    for name in ADAPTERS
                )
            )

    responses = asyncio.run(load_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # the admin lease ran them one at a time, so none of the four was lost in the store
    everywhere = wait_for(
        lambda: all(set(ADAPTERS) <= set(e["adapters"]) for e in replicas(cluster)), timeout=5
    )
    assert everywhere, replicas(cluster)
    fs, name = bucket
    assert fs.exists(f"{name}/store/adapters/ad3/v1/_COMPLETE.json")  # published through S3
    # the router learns what is resident from the replicas' routing stats (one report per
    # STATS_PERIOD_S, through Serve's controller): a burst sent at once after the loads
    # scored 89/96 in two of three runs, 94-96 after two periods
    time.sleep(2 * STATS_PERIOD_S)

    # 96 requests as bench/replicas.py sends: the first request of an adapter on a replica is
    # a miss whatever the router does (4-8 of them), and 64 left room for only 6 (one flaky run
    # of `make test` had 57 of 64)
    hits, total = asyncio.run(_round_robin(cluster, requests=96, concurrency=8))
    assert total == 96
    assert hits / total >= 0.9, (hits, total)


async def _round_robin(cluster: ReplicatedServer, requests: int, concurrency: int):
    """Requests landing where their adapter was already resident: in the last
    `/v1/replicas` report before they were sent (polled every 0.2 s, as
    bench/replicas.py does), or because that replica served the adapter before."""
    resident = {e["id"]: set(e["resident_adapters"]) for e in replicas(cluster)}
    jobs = list(itertools.islice(itertools.cycle(ADAPTERS), requests))
    hits = total = 0
    async with httpx.AsyncClient(timeout=120) as http:

        async def poll() -> None:
            while True:
                response = await http.get(f"{cluster.v1}/replicas", headers=ADMIN)
                for entry in response.json()["data"]:
                    resident.setdefault(entry["id"], set()).update(entry["resident_adapters"])
                await asyncio.sleep(0.2)

        poller = asyncio.create_task(poll())

        async def worker() -> None:
            nonlocal hits, total
            while jobs:
                model = jobs.pop(0)
                known = {r: set(models) for r, models in resident.items()}
                response = await http.post(
                    f"{cluster.v1}/chat/completions", json=chat_body(model), headers=CLIENT
                )
                assert response.status_code == 200, response.text
                replica = response.headers["x-ragtune-replica"]
                hits += model in known.get(replica, set())
                total += 1
                resident.setdefault(replica, set()).add(model)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        poller.cancel()
    return hits, total


def test_unload_is_404_on_every_replica_within_5s(cluster: ReplicatedServer) -> None:
    response = httpx.post(
        f"{cluster.v1}/unload_lora_adapter", json={"lora_name": "ad3"}, headers=ADMIN, timeout=60
    )
    assert response.status_code == 200, response.text
    started = time.monotonic()
    gone = wait_for(lambda: all("ad3" not in e["adapters"] for e in replicas(cluster)), 5)
    assert gone and time.monotonic() - started < 5
    seen = set()
    for _ in range(8):
        response = httpx.post(
            f"{cluster.v1}/chat/completions", json=chat_body("ad3"), headers=CLIENT
        )
        assert response.status_code == 404, response.text
        seen.add(response.headers["x-ragtune-replica"])
    assert seen  # 404 from whichever replica the router chose, each one refuses


def test_index_built_on_one_replica_is_served_through_s3(cluster: ReplicatedServer, bucket) -> None:
    response = httpx.post(
        f"{cluster.v1}/indexes/docs/build",
        json={"sources": ["manual.md"]},
        headers=ADMIN,
        timeout=300,
    )
    assert response.status_code == 200, response.text
    fs, name = bucket
    pointers = json.loads(fs.cat_file(f"{name}/store/registry/indexes.json"))
    generation = pointers["indexes"]["docs"]
    assert fs.exists(f"{name}/store/indexes/docs/{generation}/_COMPLETE.json")
    served_by = set()
    # idle replicas share base requests at random; right after the build, Serve's cached
    # queue length of the building replica may still be 1 for a few seconds (seen once in a
    # full run: 10 quick requests all on the other replica), so keep asking for a while
    for _ in range(40):
        body = {**chat_body(BASE), "rag": {"index": "docs", "top_k": 1}}
        # a replica's first RAG request loads the index and the embedder from the store
        # (5-10 s on a slow machine: httpx's default 5 s timed out once)
        response = httpx.post(
            f"{cluster.v1}/chat/completions", json=body, headers=CLIENT, timeout=120
        )
        assert response.status_code == 200, response.text
        assert "dock 7" in response.json()["sources"][0]["text"]
        served_by.add(response.headers["x-ragtune-replica"])
        if len(served_by) == 2:
            break
        time.sleep(0.5)
    assert len(served_by) == 2


@pytest.mark.slow
def test_sigkill_of_a_replica_under_load(cluster: ReplicatedServer) -> None:
    before = {e["id"] for e in replicas(cluster)}
    victim = replicas(cluster)[0]
    results: list[tuple[float, int]] = []
    stop_at = time.monotonic() + 30

    async def load() -> None:
        async with httpx.AsyncClient(timeout=120) as http:

            async def worker(models) -> None:
                while time.monotonic() < stop_at:
                    started = time.monotonic()
                    try:
                        response = await http.post(
                            f"{cluster.v1}/chat/completions",
                            json=chat_body(next(models)),
                            headers=CLIENT,
                        )
                        status = response.status_code
                    except httpx.HTTPError:
                        status = 0
                    results.append((started, status))

            await asyncio.gather(*(worker(itertools.cycle(ADAPTERS[:3])) for _ in range(8)))

    async def scenario() -> tuple[float, dict]:
        task = asyncio.create_task(load())
        await asyncio.sleep(6)
        state = next(e for e in replicas(cluster) if e["id"] == victim["id"])
        killed = time.monotonic()
        os.kill(state["pid"], signal.SIGKILL)
        await task
        return killed, state

    killed, state = asyncio.run(scenario())
    failed_before = [s for t, s in results if s != 200 and t < killed]
    failed_after = [s for t, s in results if s != 200 and t >= killed]
    assert not failed_after, failed_after
    assert len(failed_before) <= state["running"] + state["waiting"]

    def replaced() -> list[dict] | None:
        entries = replicas(cluster)
        ids = {e["id"] for e in entries}
        fresh = len(entries) == 2 and victim["id"] not in ids and all(e["ready"] for e in entries)
        return entries if fresh and ids - before else None

    back = wait_for(replaced, timeout=max(1.0, 60 - (time.monotonic() - killed)), step=1)
    assert back, "no replacement replica within 60 s of the kill"
    newcomer = next(e for e in back if e["id"] not in before)
    assert {"ad0", "ad1", "ad2"} <= set(newcomer["adapters"])  # loaded before it started
