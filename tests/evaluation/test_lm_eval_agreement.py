"""Issue #17's lm-evaluation-harness check, small: the shipped PubMedQA task
(`bench/lm_eval/ragtune_pubmedqa.yaml`) on the shortest questions of data/pubmedqa, scored
as `lm_eval --model local-completions` scores it (its default tokenized requests, over real
HTTP against a real fp32 dense server) and as `lm_eval --model hf` / `hf` with `peft=`
scores it (Hugging Face transformers and PEFT on the same fp32 model directory), base model
and a LoRA adapter. lm-eval itself pulls datasets, pandas and pyarrow into the environment, so
the suite sends its requests and applies its formulas here; `bench/README.md` runs the real
`lm_eval` on all 500 questions and `bench/lm_eval_agreement.py` compares the logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jinja2
import pytest
import torch
import yaml

from evaluation.likelihood import encode_pair
from ragtune.launcher import start_server
from tests.conftest import API_KEY, BASE_MODEL, SERVER_ENV

pytestmark = pytest.mark.slow  # ~30 s: lm-eval, Hugging Face and PEFT beside a server

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "bench/lm_eval/ragtune_pubmedqa.yaml"
QUESTIONS = 6  # the shortest prompts: 18 requests per model keep the test fast
ADAPTER = "beta"  # r=16 on attention and MLP (tests/conftest.py)
# nats; the issue allows 0.05, fp32 on both sides agrees far closer (test_likelihood.py)
CLOSE = 2e-3


def task_requests() -> list[tuple[str, list[str]]]:
    """(context, continuations) of the shortest questions, rendered from the task file as
    lm-eval renders them: `doc_to_text`, and `target_delimiter` (default " ") + each choice."""
    task = yaml.safe_load(TASK.read_text(encoding="utf-8"))
    path = ROOT / task["dataset_kwargs"]["data_files"]["test"]
    with path.open(encoding="utf-8") as lines:  # not splitlines(): abstracts hold U+2028
        docs = [json.loads(line) for line in lines if line.strip()]
    text = jinja2.Environment().from_string(task["doc_to_text"])
    delimiter = task.get("target_delimiter", " ")
    contexts = sorted((text.render(**doc) for doc in docs), key=lambda ctx: (len(ctx), ctx))
    return [(ctx, [delimiter + c for c in task["doc_to_choice"]]) for ctx in contexts[:QUESTIONS]]


@pytest.fixture(scope="module")
def fp32_server(tmp_path_factory, adapter_root: Path):
    env = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__QUANTIZATION": "none",
        "RAGTUNE_MODEL__DTYPE": "fp32",
        "RAGTUNE_ENGINE__WEIGHTS": "dense",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapter_root)]),
    }
    log = tmp_path_factory.mktemp("lm-eval-server") / "server.log"
    running = start_server(env, log, ["--adapter", f"{ADAPTER}={adapter_root / ADAPTER}"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def hf_models(adapter_root: Path):
    """The fp32 model directory the server serves, with the adapter through PEFT (as
    lm-eval's `hf` loads `peft=`), and its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models.loader import resolve_model_dir

    directory = resolve_model_dir("bundled", default_home())
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / ADAPTER).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def local_completions(client: httpx.Client, model: str, ctx: list[int], cont: list[int]):
    """lm-eval's `local-completions` loglikelihood request (`_create_payload`, batch size 1,
    tokenized) and `parse_logprobs`: the sum of the echoed logprobs past the context, less
    the one generated token; greedy when each is its position's top logprob."""
    payload = {
        "model": model,
        "prompt": [ctx + cont],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = client.post("/completions", json=payload)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    picked = logprobs["token_logprobs"][len(ctx) : -1]
    tops = logprobs["top_logprobs"][len(ctx) : -1]
    assert len(picked) == len(cont)
    return sum(picked), all(lp == max(top.values()) for lp, top in zip(picked, tops, strict=True))


def hf_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's `hf` (`HFLM._loglikelihood_tokens`): one forward over context + continuation
    less its last token, log-softmax of the continuation's rows."""
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(logprobs[torch.arange(len(cont)), target].sum()), greedy


def test_local_completions_agrees_with_hf_and_peft(fp32_server, hf_models) -> None:
    model, tokenizer = hf_models

    def tokenize(text: str) -> list[int]:  # lm-eval: no special tokens (add_bos_token False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    headers = {"Authorization": f"Bearer {API_KEY}"}
    shifts = []
    with httpx.Client(base_url=fp32_server.v1, headers=headers, timeout=120) as client:
        for served, peft_on in ((BASE_MODEL, False), (ADAPTER, True)):
            for context, continuations in task_requests():
                ours, theirs = [], []
                for continuation in continuations:
                    ctx, cont = encode_pair(tokenize, context, continuation)
                    ours.append(local_completions(client, served, ctx, cont))
                    if peft_on:
                        theirs.append(hf_loglikelihood(model, ctx, cont))
                    else:
                        with model.disable_adapter():
                            theirs.append(hf_loglikelihood(model, ctx, cont))
                for (ll, greedy), (expected, hf_greedy) in zip(ours, theirs, strict=True):
                    assert abs(ll - expected) <= CLOSE, (served, context[-60:], ll, expected)
                    assert greedy == hf_greedy
                chosen = max(range(len(ours)), key=lambda i: (ours[i][0], -i))
                assert chosen == max(range(len(theirs)), key=lambda i: (theirs[i][0], -i))
                shifts.append([ll for ll, _ in ours])
    # the adapter reached both sides: it moves the log-likelihoods, and both sides agree on it
    base, tuned = shifts[:QUESTIONS], shifts[QUESTIONS:]
    moved = [
        abs(x - y) for b, t in zip(base, tuned, strict=True) for x, y in zip(b, t, strict=True)
    ]
    assert max(moved) > 0.05
