"""The two record types of `ragtune prepare`: units cut from documents, and the chat
examples the recipes make from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Unit:
    """A piece of one document that becomes one or more examples (paragraph, function...)."""

    doc_id: str
    title: str
    text: str
    heading: str = ""
    kind: str = "paragraph"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Example:
    doc_id: str
    recipe: str
    messages: list[dict[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "doc_id": self.doc_id, "recipe": self.recipe}

    @property
    def text(self) -> str:
        return "\n".join(message["content"] for message in self.messages)


def chat(user: str, assistant: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages
