"""Two `ragtune serve` processes on one shared store: an adapter loaded through one is served
by the other at once (the other catches up with the store on the unknown name instead of
answering 404 until its next poll); a name nobody loaded is still a 404."""

from __future__ import annotations

import json

import openai
import pytest

from ragtune.launcher import start_server
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV
from tests.engine.families import load_adapter_over_http, peft_adapter, save_model_dir


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("catch-up")
    model, _ = save_model_dir("llama", root / "model")
    peft_adapter(model, "llama", root / "adapters" / "fresh", rank=4, seed=3)
    common = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__SOURCE": str(root / "model"),
        "RAGTUNE_MODEL__SERVED_MODEL_NAME": "tiny-llama",
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root / "adapters")]),
        "RAGTUNE_STORE__URL": str(root / "store"),
        "RAGTUNE_STORE__POLL_S": "5",  # the longest allowed: a poll would come too late
    }
    servers = [
        start_server({**common, "RAGTUNE_HOME": str(root / f"home{i}")}, root / f"server{i}.log")
        for i in (0, 1)
    ]
    yield servers, root
    for server in servers:
        server.stop()


def test_an_adapter_loaded_on_one_server_is_served_by_the_other_at_once(two_servers) -> None:
    (first, second), root = two_servers
    load_adapter_over_http(first.v1, ADMIN_KEY, "fresh", root / "adapters" / "fresh")
    client = openai.OpenAI(base_url=second.v1, api_key=API_KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="fresh", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert completion.model == "fresh"
    assert completion.usage.completion_tokens >= 1
    assert "fresh" in {m.id for m in client.models.list()}


def test_a_name_no_server_loaded_is_still_a_404(two_servers) -> None:
    (_, second), _ = two_servers
    client = openai.OpenAI(base_url=second.v1, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(
            model="never-loaded", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
    assert error.value.body["code"] == "model_not_found"
