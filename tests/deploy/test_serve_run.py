"""`serve run configs/ray/serve.yaml`: the same application `ragtune serve --replicas` deploys,
started by Serve's own CLI as a KubeRay RayService or an operator would, with the environment
docs/deploy.md gives and the shipped config (its port and the model swapped for a free port
and a tiny Llama). The official `openai` client works against it, both replicas serve, and
Ctrl-C takes the application and the local cluster `serve run` started down, HAProxy with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("ray.serve")

from ragtune.config import Settings
from ragtune.launcher import free_settled_port
from server.deploy.launch import SERVE_ENVIRONMENT, haproxy_wrapper, router_buffer_bytes
from tests.deploy.tiny_cluster import tiny_replica_env
from tests.engine.families import save_model_dir

pytestmark = pytest.mark.slow  # ~35 s: its own local Ray cluster

ROOT = Path(__file__).resolve().parents[2]
# `serve run` as from a terminal: a shell's background job (CI's, say) ignores SIGINT, and a
# child inherits that, so Ctrl-C would never reach it
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
API_KEY, ADMIN_KEY = "serve-run-client", "serve-run-admin"
BASE = "tiny-llama"


MARKER = "RAGTUNE_TEST_CLUSTER"


def cluster_processes(tag: str) -> set[int]:
    """Pids of the processes `serve run` started, whatever they are (GCS, raylet, workers,
    agents, HAProxy): each inherits the tag in its environment, which no other process has."""
    needle = f"{MARKER}={tag}".encode()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_gone(tag: str, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := cluster_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`serve run` on a copy of configs/ray/serve.yaml; yields (base URL, process, log path)."""
    root = tmp_path_factory.mktemp("serve_run")
    tag = uuid.uuid4().hex
    save_model_dir("llama", root / "model")
    port = free_settled_port()
    config = yaml.safe_load((ROOT / "configs/ray/serve.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["config"] = str(ROOT / "configs/default.yaml")
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        **SERVE_ENVIRONMENT,  # what docs/deploy.md asks every `ray start` and `serve run` for
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(router_buffer_bytes(Settings())),
        "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy_wrapper(),  # $(command -v ragtune-haproxy)
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_settled_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_settled_port()),
        **tiny_replica_env(root, API_KEY, ADMIN_KEY, BASE),
    }
    env[MARKER] = tag
    env["RAY_ADDRESS"] = "local"  # a cluster of its own, even where another runs here
    serve_cli = Path(sys.executable).with_name("serve")
    log_path = root / "serve_run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGINT, str(serve_cli), "run", str(root / "serve.yaml")],
            cwd=root,  # the config's paths are absolute: nothing depends on the directory
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-6000:]
            try:
                ready = httpx.get(f"{base_url}/ready", timeout=2)
                if ready.status_code == 200 and ready.json().get("replicas") == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"not ready after 300 s:\n{log_path.read_text()[-6000:]}")
        yield base_url, process, log_path, tag
    finally:
        if process.poll() is None:  # a test failed before Ctrl-C was sent
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in wait_gone(tag, 30):  # never left for the rest of the run, whatever happened
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_openai_client_reaches_both_replicas(served) -> None:
    import openai

    base_url, *_ = served
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY)
    assert BASE in [m.id for m in client.models.list().data]
    seen = set()
    for _ in range(16):  # ties go either way: all 16 on one replica is 2 in 65,536
        raw = client.chat.completions.with_raw_response.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.parse().choices[0].message.content is not None
        seen.add(raw.headers["x-ragtune-replica"])
    stream = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert [chunk.choices[0].finish_reason for chunk in stream if chunk.choices][-1]
    listing = httpx.get(
        f"{base_url}/v1/replicas", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    assert listing.status_code == 200, listing.text
    assert seen == {r["id"] for r in listing.json()["data"] if r["ready"]}
    assert len(seen) == 2


def test_keys_from_the_environment_hold(served) -> None:
    base_url, *_ = served
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    response = httpx.get(
        f"{base_url}/v1/replicas", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    assert response.status_code == 403, response.text


def test_a_route_chooser_restart_answers_in_openai_shape(served) -> None:
    """POSTs while Serve restarts a SIGKILLed route chooser get OpenAI's error JSON (a 503 the
    `openai` client retries), not HAProxy's plain text; then they are served again."""
    import openai

    base_url, _, _, tag = served
    chooser = next(
        pid
        for pid in cluster_processes(tag)
        if b"RouteChooser" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(chooser, signal.SIGKILL)
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=auth, timeout=30)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "route_unavailable"
    assert response.headers["retry-after"] == "5"
    # retried after each 503's Retry-After (the default 2 retries span ~10 s; a slow CI
    # machine may restart the chooser more slowly)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=6)
    answer = client.chat.completions.create(**body)
    assert answer.choices[0].message.content is not None


def test_ctrl_c_takes_the_cluster_down(served) -> None:
    """Last: `serve run` on Ctrl-C stops the application and the cluster it started."""
    _, process, log_path, tag = served
    assert cluster_processes(tag) - {process.pid}  # the tag does mark the cluster's processes
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve run still up 60 s after Ctrl-C:\n{log_path.read_text()[-4000:]}")
    left = wait_gone(tag, 30)
    assert not left, json.dumps(
        {pid: Path(f"/proc/{pid}/cmdline").read_text(errors="replace")[:120] for pid in left}
    )
