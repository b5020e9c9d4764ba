"""The one place a conversation becomes prompt text: the server and training both call this,
so an adapter is always served with the template it was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ChatML, which SmolLM2 uses; for tokenizers without a template of their own and without
# Gemma's turn tokens.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format, as in Gemma 3's official template: BOS first, roles `user` and `model`
# only, a leading system message folded into the first user turn (a system message with no
# user turn after it, or one later on, becomes a user turn), contents trimmed. Unlike the
# official template it does not raise on roles that do not alternate.
GEMMA_TURN_START = "<start_of_turn>"
GEMMA_TURN_END = "<end_of_turn>"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' and messages | length > 1 "
    "and messages[1]['role'] == 'user' -%}"
    "{%- set ns.prefix = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + ns.prefix + (message['content'] | trim) "
    "+ '<end_of_turn>\n' }}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _has_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != tokenizer.unk_token_id


def is_gemma_tokenizer(tokenizer: Any) -> bool:
    """Gemma's vocabularies carry `<start_of_turn>` as a single token; others do not."""
    return _has_token(tokenizer, GEMMA_TURN_START)


def fallback_chat_template(tokenizer: Any) -> str:
    """The model family's turn format, for a tokenizer that ships no template (GGUFs often
    do not): Gemma's for Gemma tokenizers, ChatML otherwise."""
    return GEMMA_CHAT_TEMPLATE if is_gemma_tokenizer(tokenizer) else CHATML_CHAT_TEMPLATE


def turn_end_token(tokenizer: Any) -> str | None:
    """The token that ends a reply in the fallback format, if the vocabulary has it (it must
    stop generation like EOS does)."""
    if getattr(tokenizer, "chat_template", None):
        return None
    token = GEMMA_TURN_END if is_gemma_tokenizer(tokenizer) else "<|im_end|>"
    return token if _has_token(tokenizer, token) else None


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,  # for templates that take them (server/tools.py)
) -> str:
    """Messages ({"role", "content"} with string content) -> prompt text via the chat template."""
    template = getattr(tokenizer, "chat_template", None) or fallback_chat_template(tokenizer)
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt text (already templated) -> token ids; the template carries special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
