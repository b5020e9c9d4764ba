"""Loss on assistant tokens only, with the server's chat template; and the demo scorer."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.models.chat import render_chat
from training.encoding import IGNORE_INDEX, PadCollator, encode_chat
from training.evaluate import keyword_hit, score, token_f1


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ragtune.config import default_home
    from ragtune.models import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))


def _labelled_text(tokenizer, encoded) -> str:
    return tokenizer.decode(
        [
            t
            for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
            if label != IGNORE_INDEX
        ]
    )


def test_only_assistant_turns_are_labelled(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "How long is the return window?"},
        {"role": "assistant", "content": "21 days from delivery."},
        {"role": "user", "content": "会議室は何時間まで？"},
        {"role": "assistant", "content": "最大2時間です。"},
    ]
    encoded = encode_chat(tokenizer, messages, max_len=512)
    assert encoded is not None
    # the ids are exactly the server's prompt text, tokenized as one string
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _labelled_text(tokenizer, encoded) == (
        "21 days from delivery.<|im_end|>最大2時間です。<|im_end|>"
    )


def test_system_and_user_tokens_never_labelled(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You answer for Orvane Logistics."},
        {"role": "user", "content": "Which VPN?"},
        {"role": "assistant", "content": "Tunnelway."},
    ]
    encoded = encode_chat(tokenizer, messages, max_len=512)
    assert _labelled_text(tokenizer, encoded) == "Tunnelway.<|im_end|>"


def test_truncation_that_drops_every_answer_token_drops_the_example(tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    assert encode_chat(tokenizer, messages, max_len=20) is None
    kept = encode_chat(tokenizer, messages, max_len=200)
    assert kept is not None and len(kept.input_ids) <= 200


def test_collator_pads_labels_with_ignore_index() -> None:
    batch = PadCollator(pad_token_id=2)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_demo_scoring() -> None:
    assert keyword_hit("Use the keystone app.", ["Keystone"])
    assert not keyword_hit("Use an authenticator.", ["Keystone"])
    assert token_f1(
        "within 21 days of delivery", "Customers may return goods within 21 days of delivery."
    ) == pytest.approx(2 * 1.0 * (5 / 9) / (1 + 5 / 9))
    assert token_f1("最大2時間", "最大2時間までです。") > 0.5
    questions = [
        {"answer": "Gate C.", "keywords": ["Gate C"]},
        {"answer": "WS-9 form.", "keywords": ["WS-9"]},
    ]
    assert score(["Assembly point Gate C.", "No idea."], questions)["keyword_hit_rate"] == 0.5


def test_eval_questions_are_not_training_prompts(tmp_path: Path) -> None:
    """The demo's held-out questions must not appear among the prompts prepare writes."""
    import json

    from training.prepare import PrepareOptions, prepare

    repo = Path(__file__).resolve().parents[2]
    questions = [
        json.loads(line)["question"]
        for line in (repo / "data/demo/eval_questions.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    assert len(questions) == 40
    out = tmp_path / "p"
    prepare(
        PrepareOptions(
            sources=[repo / "data/demo/docs"], recipe="qa", out=out, val_ratio=0.1, test_ratio=0
        )
    )
    prompts = {
        json.loads(line)["messages"][0]["content"]
        for name in ("train.jsonl", "val.jsonl")
        for line in (out / name).read_text(encoding="utf-8").splitlines()
    }
    assert not prompts & set(questions)
