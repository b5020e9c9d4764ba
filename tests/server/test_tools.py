"""Tool calling through the official client on the bundled model (no tool template of its
own: the Hermes format): `required` and a named function give arguments that validate against
the function's schema every time, streamed and not; tool results sent back as history are
answered; misuse is a 400 naming the field."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.conftest import API_KEY, BASE_MODEL


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


class TimeArgs(BaseModel):
    model_config = {"extra": "forbid"}
    timezone: str = Field(max_length=30)


def tool(name: str, args: type[BaseModel], description: str) -> dict:
    schema = args.model_json_schema()
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": schema},
    }


TOOLS = [
    tool("get_weather", WeatherArgs, "Current weather in a city"),
    tool("get_time", TimeArgs, "Current time in a timezone"),
]
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        ARGS[call.function.name].model_validate(json.loads(call.function.arguments))


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_forced_calls_always_validate(client, tool_choice):
    for seed in range(3):
        completion = client.chat.completions.create(
            model=BASE_MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=128,
            temperature=1.0,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        check_calls(choice.message.tool_calls)
        if isinstance(tool_choice, dict):
            assert {c.function.name for c in choice.message.tool_calls} == {"get_time"}


def test_forced_calls_stream(client):
    stream = client.chat.completions.create(
        model=BASE_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=128,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    check_calls(calls)
    assert [call.index for call in calls] == list(range(len(calls)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_and_tool_results_as_history(client):
    first = client.chat.completions.create(
        model=BASE_MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert message.content or message.tool_calls
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model=BASE_MODEL, messages=history, tools=TOOLS, max_tokens=40, temperature=0
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "other"}}, "tool_choice"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)
def test_tool_misuse_is_400_naming_the_field(server, extra, param):
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": BASE_MODEL, "messages": ASK, **extra},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].split(".")[0] == param
