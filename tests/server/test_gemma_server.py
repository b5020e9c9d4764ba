"""The bundled multilingual model served: `bundled:gemma-3-270m` runs in the compact engine
(its Gemma 3 module), streams Japanese without ever splitting a character, and a LoRA that
`ragtune train` makes on it loads over the admin API and changes its answers."""

from __future__ import annotations

import json

import httpx
import pytest

from ragtune.config import default_home
from ragtune.launcher import start_server
from tests.conftest import ADMIN_KEY, API_KEY, SERVER_ENV
from tests.engine.families import load_adapter_over_http
from training.config import TrainConfig
from training.trainer import train

pytestmark = pytest.mark.slow
MODEL = "gemma-3-270m"
PROMPT = "社内の就業規則によると、有給休暇の申請は"
QA = [
    ("有給休暇は何日前までに申請しますか。", "有給休暇は5営業日前までに様式KH-12で申請します。"),
    ("経費精算のシステムは何ですか。", "経費精算はレジャリーで行います。"),
    ("返品番号の形式は何ですか。", "返品番号はRT-から始まる8桁です。"),
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    data = root / "data"
    data.mkdir()
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    config = TrainConfig.model_validate(
        {
            "name": "kisoku",
            "base_model": "bundled:gemma-3-270m",
            "data": data,
            "output": root / "adapters" / "kisoku" / "v1",
            "max_steps": 3,
            "batch_size": 1,
            "max_seq_len": 48,
            "eval_steps": 3,
            "warmup_steps": 0,
            "learning_rate": 2e-3,
            "progress": False,
            "threads": 2,
            "adapter": {"r": 8, "alpha": 16},
        }
    )
    adapter = train(config, home=default_home()).adapter_dir
    env = {
        **SERVER_ENV,
        "RAGTUNE_MODEL__SOURCE": "bundled:gemma-3-270m",
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root / "adapters")]),
    }
    running = start_server(env, root / "server.log")
    yield running, adapter
    running.stop()


def complete(running, model: str, stream: bool = False) -> list[str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if not stream:
        response = httpx.post(f"{running.v1}/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        return [response.json()["choices"][0]["text"]]
    parts = []
    with httpx.stream(
        "POST", f"{running.v1}/completions", json=body, headers=headers, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                parts += [c["text"] for c in json.loads(line[6:])["choices"]]
    return parts


def test_gemma_runs_in_the_compact_engine_and_streams_whole_characters(gemma):
    running, _ = gemma
    models = httpx.get(f"{running.v1}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    [card] = [m for m in models.json()["data"] if m["id"] == MODEL]
    assert card["runner"] == "compact:gemma3"
    [whole] = complete(running, MODEL)
    parts = complete(running, MODEL, stream=True)
    assert "".join(parts) == whole
    assert not any("\ufffd" in part for part in parts)
    assert any("\u3040" <= ch <= "\u9fff" for ch in whole)  # it writes Japanese


def test_a_trained_gemma_lora_loads_and_changes_the_answer(gemma):
    running, adapter = gemma
    load_adapter_over_http(running.v1, ADMIN_KEY, "kisoku", adapter)
    assert complete(running, "kisoku") != complete(running, MODEL)
