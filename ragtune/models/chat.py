"""The one place a conversation becomes prompt text: the server and training both call this,
so an adapter is always served with the template it was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ChatML, which SmolLM2 uses; only for tokenizers that ship no template of their own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """Messages ({"role", "content"} with string content) -> prompt text via the chat template."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt text (already templated) -> token ids; the template carries special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
