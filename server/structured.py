"""`response_format` -> the grammar a chat completion's rows must follow (server/engine/grammar.py
compiles and applies it). OpenAI's shapes: `{"type": "text"}`, `{"type": "json_object"}`,
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`."""

from __future__ import annotations

import json
from typing import Any

from server.engine.grammar import GrammarSpec
from server.protocol import ProtocolError

PARAM = "response_format"


def response_grammar(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """None for free text; a ProtocolError naming the field for a malformed format."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json")
    if kind != "json_schema":
        raise ProtocolError(
            f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
            f"{PARAM}.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ProtocolError(
            "response_format json_schema needs a 'json_schema' object with a 'schema' object",
            f"{PARAM}.json_schema",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ProtocolError("strict must be true or false", f"{PARAM}.json_schema.strict")
    return schema_grammar(spec["schema"], strict=bool(strict))


def schema_grammar(schema: dict[str, Any], strict: bool) -> GrammarSpec:
    # sorted keys: one cache entry for equal schemas whatever their key order
    return GrammarSpec("json_schema", json.dumps(schema, sort_keys=True), strict)
