"""The vLLM-compatible tokenizer routes, used the way lm-evaluation-harness's remote tokenizer
uses them (no `model`, `add_special_tokens: false`), over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY, BASE_MODEL
from tests.server.test_errors import assert_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TEXT = "Héllo wörld, 日本語 and emoji 🙂 <|im_end|> end"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers=AUTH) as session:
        yield session


def test_tokenize_then_detokenize_round_trips(http):
    tokens = http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    assert tokens["max_model_len"] == 512 + 128  # the test server's max_seq_len
    assert "token_strs" not in tokens or tokens["token_strs"] is None
    back = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": TEXT}


def test_token_strs_and_model_names(http):
    body = {"prompt": "Hello world", "return_token_strs": True, "model": BASE_MODEL}
    tokens = http.post("/tokenize", json=body).json()
    assert tokens["token_strs"] == ["Hello", "Ġworld"]  # vocabulary pieces, as vLLM
    adapter = http.post("/tokenize", json={**body, "model": "alpha"}).json()
    assert adapter["tokens"] == tokens["tokens"]  # adapters share the base tokenizer


def test_messages_count_equals_the_chat_prompt_tokens(http):
    counted = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    chat = {"model": BASE_MODEL, "messages": MESSAGES, "max_tokens": 1}
    usage = http.post("/v1/chat/completions", json=chat).json()["usage"]
    assert counted == usage["prompt_tokens"]
    bare = {"messages": MESSAGES, "add_generation_prompt": False}
    assert http.post("/tokenize", json=bare).json()["count"] < counted


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(http):
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["tokenizer_class"]
    assert info["model_max_length"] == 640 and info["vocab_size"] == 49152
    assert "<|im_start|>" in info["chat_template"]
    assert not any("path" in key or "file" in key for key in info)  # no server paths
    # lm-eval: eos_token_id = encode(eos_token)[0] with add_special_tokens false
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [info["eos_token_id"]]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, 400, "add_generation_prompt"),
        ("/tokenize", {"prompt": "a", "chat_template": "x"}, 400, "chat_template"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "a", "model": "no-such-model"}, 404, "model"),
        ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "no-such-model"}, 404, "model"),
    ],
)
def test_bad_tokenizer_requests_are_openai_errors(http, path, body, status, param):
    assert_error(http.post(path, json=body), status, param)


@pytest.mark.parametrize(
    ("method", "path"), [("post", "/tokenize"), ("post", "/detokenize"), ("get", "/tokenizer_info")]
)
def test_tokenizer_routes_need_a_client_key(server, method, path):
    response = httpx.request(method, f"{server.base_url}{path}", json={"prompt": "a"}, timeout=30)
    assert_error(response, 401)
