"""Tool calling: `tools` and `tool_choice` into the prompt and the grammar, the reply back into
OpenAI `tool_calls`.

Prompt: a chat template that takes `tools` (Qwen2.5, Llama 3.1, Hermes fine-tunes) gets them
as is. Templates without (SmolLM2, Gemma 3 270M) get the Hermes format Qwen2.5 uses: a system
block listing the function signatures in <tools></tools>, calls written as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>, results sent back as a user turn of
<tool_response></tool_response> blocks.

Reply: `auto` parses <tool_call> blocks out of free text. `required` and a named function
constrain the whole reply with a grammar: a JSON array of calls (an object for one named
function or parallel_tool_calls false) whose arguments follow each function's parameter
schema, so arguments always validate.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from server.chat_protocol import ChatMessage, ToolChoice, ToolDefinition
from server.engine.grammar import GrammarSpec
from server.structured import schema_grammar

# Calls in one forced reply with parallel_tool_calls: small models rarely close the list on
# their own, so the grammar does it
MAX_PARALLEL_CALLS = 3
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{signatures}\n</tools>\n\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def template_takes_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def tool_conversation(
    messages: list[ChatMessage], tools: list[ToolDefinition] | None, native: bool
) -> list[dict[str, Any]]:
    """Messages for the chat template, tool calls and results included: OpenAI's shapes for a
    template that takes tools (`native`), the Hermes text format otherwise."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if native:
            turn: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                turn["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {
                            "name": c.function.name,
                            "arguments": _json_object(c.function.arguments),
                        },
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id:
                turn["tool_call_id"] = m.tool_call_id
            turns.append(turn)
        elif role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if turns and turns[-1].get("_tool_results"):  # consecutive results: one turn
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "_tool_results": True})
        else:
            text = m.text()
            for call in m.tool_calls or []:
                payload = {
                    "name": call.function.name,
                    "arguments": _json_object(call.function.arguments),
                }
                text += f"\n<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"
            turn = {"role": role, "content": text.strip("\n")}
            if m.name is not None:
                turn["name"] = m.name
            turns.append(turn)
    for turn in turns:
        turn.pop("_tool_results", None)
    if tools and not native:
        signatures = "\n".join(
            json.dumps(
                {"type": "function", "function": t.function.model_dump(exclude_none=True)},
                ensure_ascii=False,
            )
            for t in tools
        )
        block = HERMES_SYSTEM.format(signatures=signatures)
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{block}"
        else:
            turns.insert(0, {"role": "system", "content": block})
    return turns


def tool_grammar(
    tools: list[ToolDefinition], choice: ToolChoice, parallel: bool
) -> GrammarSpec | None:
    """The grammar a forced call must follow (None for `auto`/`none`: free text)."""
    if choice.mode in ("auto", "none"):
        return None
    chosen = [t for t in tools if choice.mode == "required" or t.function.name == choice.name]

    def call(tool: ToolDefinition) -> dict[str, Any]:
        parameters = tool.function.parameters or {"type": "object", "properties": {}}
        return {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    one = call(chosen[0]) if len(chosen) == 1 else {"anyOf": [call(t) for t in chosen]}
    if choice.mode == "function" or not parallel:
        return schema_grammar(one, strict=True)
    array = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
    return schema_grammar(array, strict=True)


def parse_reply(text: str, forced: bool) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a reply: a forced reply is the calls' JSON; a free one may hold
    <tool_call> blocks (text outside them is the content)."""
    if forced:
        value = json.loads(text)
        items = value if isinstance(value, list) else [value]
        return None, [_call(item) for item in items]
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            calls.append(_call(json.loads(block)))
        except (ValueError, KeyError, TypeError):
            continue  # not a well-formed call: it stays in the content
    if not calls:
        return text, []
    content = TOOL_CALL.sub("", text).strip()
    return content or None, calls


def _call(item: dict[str, Any]) -> ParsedCall:
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(item["name"], str) or not isinstance(arguments, dict):
        raise TypeError("not a call")
    return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def _json_object(arguments: str) -> Any:
    """A previous call's arguments (JSON text) as the template wants them; kept as text when
    they are not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def finish_reply(
    text: str, finish_reason: str | None, forced: bool
) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """(content, OpenAI tool_calls or None, finish_reason) of a finished reply. A forced reply
    cut by max_tokens is incomplete JSON: it comes back as content with reason "length"."""
    if forced and finish_reason != "stop":
        return text, None, finish_reason
    try:
        content, calls = parse_reply(text, forced)
    except (ValueError, KeyError, TypeError):
        return text, None, finish_reason
    if not calls:
        return content, None, finish_reason
    return content, [call.to_openai() for call in calls], "tool_calls"
