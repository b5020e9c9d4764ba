"""The multilingual bundled model (Gemma 3 270M): names, chunk assembly with its SHA-256,
Gemma's turn format, and the real model loaded through load_base_model."""

from __future__ import annotations

import re
import shutil

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from ragtune.config import BUNDLED_MODELS, ModelConfig, bundled_model_name, default_home
from ragtune.models import load_base_model, resolve_model_dir
from ragtune.models.assemble import assemble_chunks
from ragtune.models.bundled import BUNDLED_LLMS, bundled_llm_gguf, gguf_chunks, licence_files
from ragtune.models.chat import (
    CHATML_CHAT_TEMPLATE,
    GEMMA_CHAT_TEMPLATE,
    encode_prompt,
    fallback_chat_template,
    render_chat,
)
from ragtune.models.convert import convert_gguf
from training.encoding import IGNORE_INDEX, encode_chat

GEMMA = "bundled:gemma-3-270m"
JAPANESE = "就業規則の第3条を確認してください。"


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """The converted Gemma tokenizer (the first run converts the model, about a minute)."""
    return AutoTokenizer.from_pretrained(resolve_model_dir(GEMMA, default_home()))


def test_bundled_names():
    assert tuple(BUNDLED_LLMS) == BUNDLED_MODELS
    assert bundled_model_name("bundled") == "smollm2-135m-instruct"
    assert bundled_model_name("bundled:smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert bundled_model_name(GEMMA) == "gemma-3-270m"
    assert bundled_model_name("/models/bundled") is None
    with pytest.raises(ValueError, match="valid names: bundled, bundled:smollm2-135m-instruct"):
        bundled_model_name("bundled:gemma-2b")


def test_unknown_bundled_name_is_a_config_error(tmp_path):
    with pytest.raises(ValidationError, match="bundled:gemma-3-270m"):
        ModelConfig(source="bundled:xyz")
    with pytest.raises(ValueError, match="unknown bundled model 'bundled:xyz'"):
        resolve_model_dir("bundled:xyz", tmp_path)


def test_served_name_follows_the_bundled_source():
    assert ModelConfig(source=GEMMA).served_model_name == "gemma-3-270m"
    assert ModelConfig(source="bundled").served_model_name == "smollm2-135m-instruct"
    assert ModelConfig(source=GEMMA, served_model_name="kb-ja").served_model_name == "kb-ja"


def test_plain_bundled_still_means_smollm2():
    home = default_home()
    assert resolve_model_dir("bundled", home) == resolve_model_dir(
        "bundled:smollm2-135m-instruct", home
    )


def test_corrupted_chunk_fails_the_sha256_check(tmp_path):
    llm = BUNDLED_LLMS["gemma-3-270m"]
    copies = []
    for chunk in gguf_chunks(llm):
        copies.append(tmp_path / chunk.name)
        shutil.copyfile(chunk, copies[-1])
    with open(copies[2], "r+b") as handle:  # flip one byte in the middle of a chunk
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "out" / llm.gguf
    with pytest.raises(ValueError, match="SHA-256"):
        assemble_chunks(copies, target, llm.sha256)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_damaged_assembled_file_is_reassembled(tmp_path):
    target = tmp_path / "models" / "gguf" / BUNDLED_LLMS["gemma-3-270m"].gguf
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF truncated")
    assert bundled_llm_gguf("gemma-3-270m", tmp_path) == target
    assert target.stat().st_size > 200_000_000


def test_conversion_refuses_a_file_with_the_wrong_sha256(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match="SHA-256"):
        convert_gguf(bogus, tmp_path / "cache", sha256="0" * 64)
    assert not (tmp_path / "cache").exists()


def test_gemma_licence_files_exist():
    names = [path.name for path in licence_files(BUNDLED_LLMS["gemma-3-270m"])]
    assert names == ["GEMMA_NOTICE", "GEMMA_TERMS.html"]
    notice = licence_files(BUNDLED_LLMS["gemma-3-270m"])[0].read_text()
    assert (
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms" in notice
    )


def test_gemma_turn_format(gemma_tokenizer):
    assert gemma_tokenizer.chat_template is None
    assert fallback_chat_template(gemma_tokenizer) == GEMMA_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Answer in Japanese."},
        {"role": "user", "content": " 首都は? "},
        {"role": "assistant", "content": "東京です。"},
        {"role": "user", "content": "Why?"},
    ]
    assert render_chat(gemma_tokenizer, messages) == (
        "<bos><start_of_turn>user\nAnswer in Japanese.\n\n首都は?<end_of_turn>\n"
        "<start_of_turn>model\n東京です。<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render_chat(gemma_tokenizer, messages[:3], add_generation_prompt=False).endswith(
        "<start_of_turn>model\n東京です。<end_of_turn>\n"
    )
    # A system message with no user turn to fold into becomes a user turn of its own.
    assert render_chat(gemma_tokenizer, messages[:1]) == (
        "<bos><start_of_turn>user\nAnswer in Japanese.<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = encode_prompt(gemma_tokenizer, render_chat(gemma_tokenizer, messages[1:2]))
    start, end = (
        gemma_tokenizer.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>")
    )
    assert ids[:2] == [gemma_tokenizer.bos_token_id, start] and ids.count(end) == 1


def test_gemma_turn_format_trains_on_model_turns_only(gemma_tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": JAPANESE},
        {"role": "assistant", "content": "第3条は勤務時間です。"},
    ]
    example = encode_chat(gemma_tokenizer, messages, max_len=256)
    labels = zip(example.input_ids, example.labels, strict=True)
    learned = [token for token, label in labels if label != IGNORE_INDEX]
    assert gemma_tokenizer.decode(learned) == "第3条は勤務時間です。<end_of_turn>"


def test_tokenizers_without_gemma_tokens_keep_chatml():
    smollm2 = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    smollm2.chat_template = None
    assert fallback_chat_template(smollm2) == CHATML_CHAT_TEMPLATE
    text = render_chat(smollm2, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_bundled_gemma_loads_and_speaks_japanese():
    import torch

    loaded = load_base_model(
        ModelConfig(source=GEMMA, quantization="none", dtype="fp32"), default_home()
    )
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.model.config.vocab_size == 262_144
    assert (loaded.model_dir / "GEMMA_NOTICE").is_file()
    tokenizer = loaded.tokenizer
    ids = tokenizer(JAPANESE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == JAPANESE and len(ids) < len(JAPANESE)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in loaded.model.generation_config.eos_token_id
    prompt = tokenizer("就業規則とは、", return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**prompt, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(re.findall(r"[\u3040-\u30ff\u4e00-\u9fff]", text)) >= 8, text
