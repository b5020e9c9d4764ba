"""An adapter directory deleted while the server has the adapter loaded.

Decided behaviour: a loaded version is immutable and validated once, so while its weights are
in memory it keeps answering from them (deleting the files is like deleting a binary that is
running). Once evicted (adapters.max_cpu_loras) it cannot come back: requests to it get a 503
`adapter_unavailable` in OpenAI's error shape, without the server's paths, until an admin
unloads it (then 404) or loads it again. Never a crash, never a silent answer from the base
model; other adapters and the base model keep answering exactly as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai

from tests.conftest import BASE_MODEL
from tests.server.test_adapters import (
    CLIENT,
    MESSAGES,
    adapters,
    assert_error,
    chat,
    must_load,
    unload,
)


def resident(http: httpx.Client) -> set[str]:
    return {
        f"{name}@{v['version']}"
        for name, a in adapters(http).items()
        for v in a["versions"]
        if v["resident"]
    }


def post_chat(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    return http.post("/v1/chat/completions", json=body, headers=CLIENT)


def test_deleted_adapter_answers_while_resident_then_fails_cleanly(
    fault_root: Path, fault_http: httpx.Client, fault_client: openai.OpenAI
) -> None:
    doomed = shutil.copytree(fault_root / "one", fault_root / "doomed")
    must_load(fault_http, "doomed", doomed)
    must_load(fault_http, "bystander", fault_root / "two")
    before = {m: chat(fault_client, m) for m in (BASE_MODEL, "doomed", "bystander")}
    assert before["doomed"] != before[BASE_MODEL]  # so a fallback to the base would show

    shutil.rmtree(doomed)
    assert "doomed@v1" in resident(fault_http)
    assert chat(fault_client, "doomed") == before["doomed"]

    must_load(fault_http, "filler", fault_root / "two", version="f1")
    must_load(fault_http, "filler", fault_root / "two", version="f2")  # evicts doomed
    assert "doomed@v1" not in resident(fault_http)
    for _ in range(2):  # the failed reload leaves nothing half-done behind
        error = assert_error(post_chat(fault_http, "doomed"), 503, code="adapter_unavailable")
        assert "doomed@v1" in error["message"] and str(fault_root) not in error["message"]
    assert "doomed" in adapters(fault_http)  # still listed: the admin decides what to do

    assert chat(fault_client, "bystander") == before["bystander"]  # reloaded from disk
    assert chat(fault_client, BASE_MODEL) == before[BASE_MODEL]
    assert unload(fault_http, "doomed").status_code == 200
    assert_error(post_chat(fault_http, "doomed"), 404, code="model_not_found")
    for name in ("bystander", "filler"):
        assert unload(fault_http, name).status_code == 200
