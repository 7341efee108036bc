"""Anthropic's Messages API through the real `anthropic` client, on scripted models that answer in words,
call tools or reason (tests/scripted_models.py): text, tool_use blocks with their input, tool results in
the history, streaming events in Anthropic's order, count_tokens, thinking blocks, the key as x-api-key or
a bearer token, and Anthropic's error shape. (The client no longer sends sampling settings; the scripted
models' logits leave no other token a chance at the default temperature.)"""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.scripted_models import ASK, REASONING, SPOKEN, TIME_CALL, WEATHER_CALL, servers  # noqa: F401 (a fixture)
from tests.test_api import KEY

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}


@pytest.fixture(scope="module")
def clients(servers):
    return {name: anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
            for name, server in servers.items()}


def blocks(message) -> list[tuple]:
    return [(b.type, b.text) if b.type == "text" else (b.type, b.thinking) if b.type == "thinking" else
            (b.type, b.id, b.name, b.input) for b in message.content]


def test_a_reply_in_words(clients):
    message = clients["talker"].messages.create(model="tiny", max_tokens=64, messages=ASK)
    assert blocks(message) == [("text", SPOKEN)] and message.stop_reason == "end_turn"
    assert message.role == "assistant" and message.usage.output_tokens > 0
    counted = clients["talker"].messages.count_tokens(model="tiny", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_tool_use_blocks_come_back_with_their_input_parsed(clients):
    message = clients["caller"].messages.create(model="tiny", max_tokens=128, messages=ASK, tools=[WEATHER, TIME])
    assert blocks(message) == [("tool_use", *WEATHER_CALL), ("tool_use", *TIME_CALL)]
    assert message.stop_reason == "tool_use"


def test_streaming_events_come_in_anthropic_order(servers, clients):
    request = {"model": "tiny", "max_tokens": 128, "messages": ASK, "tools": [WEATHER, TIME]}
    with httpx.stream("POST", f"{servers['caller'].url}/v1/messages", json={**request, "stream": True},
                      headers={"x-api-key": KEY}) as response:
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events == ["message_start",
                      "content_block_start", "content_block_delta", "content_block_stop",
                      "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "message_stop"]
    with clients["caller"].messages.stream(**request) as stream:
        streamed = stream.get_final_message()
    assert blocks(streamed) == [("tool_use", *WEATHER_CALL), ("tool_use", *TIME_CALL)]
    assert streamed.stop_reason == "tool_use"
    with clients["talker"].messages.stream(model="tiny", max_tokens=64, messages=ASK) as stream:
        assert "".join(stream.text_stream) == SPOKEN


def test_tool_results_in_the_history_render_and_generate(clients):
    first = clients["caller"].messages.create(model="tiny", max_tokens=128, messages=ASK, tools=[WEATHER, TIME])
    results = [{"type": "tool_result", "tool_use_id": block.id, "content": content}
               for block, content in zip(first.content, ["18 C, clear", [{"type": "text", "text": "12:00"}]])]
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                     {"role": "user", "content": results}]
    message = clients["caller"].messages.create(model="tiny", max_tokens=128, messages=history,
                                                tools=[WEATHER, TIME])
    assert message.stop_reason == "tool_use" and message.usage.input_tokens > first.usage.input_tokens
    # The model writes functions.get_weather:0 every turn; ids count the conversation's calls instead.
    assert [b.id for b in message.content] == ["functions.get_weather:2", "functions.get_time:3"]


def test_the_history_is_rendered_with_kimis_ids_whatever_the_clients(clients):
    def history(ids: list[str]) -> list[dict]:
        calls = [{"type": "tool_use", "id": ids[i], "name": name, "input": arguments}
                 for i, (_, name, arguments) in enumerate([WEATHER_CALL, TIME_CALL])]
        results = [{"type": "tool_result", "tool_use_id": call["id"], "content": "done"} for call in calls]
        return ASK + [{"role": "assistant", "content": calls}, {"role": "user", "content": results}]
    counted = [clients["caller"].messages.count_tokens(model="tiny", messages=history(ids), tools=[WEATHER, TIME])
               .input_tokens for ids in (["toolu_01A", "toolu_01B-with-a-longer-id"], ["x", "x"],
                                         [WEATHER_CALL[0], TIME_CALL[0]])]
    assert counted[0] == counted[1] == counted[2]  # each rendered as functions.NAME:N, N counting the calls


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_any_and_a_named_tool_make_a_talking_model_call(clients, tool_choice):
    message = clients["talker"].messages.create(model="tiny", max_tokens=64, messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice=tool_choice)
    assert blocks(message) == [("tool_use", *WEATHER_CALL)] and message.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_cut_by_max_tokens_is_dropped_and_the_complete_one_stays(clients, stream):
    """The caller writes two calls; max_tokens ends its reply inside the second's input."""
    request = {"model": "tiny", "messages": ASK, "tools": [WEATHER, TIME]}
    whole = clients["caller"].messages.create(max_tokens=128, **request).usage.output_tokens
    if stream:
        with clients["caller"].messages.stream(max_tokens=whole - 5, **request) as events:
            kinds = [e.type for e in events]
            message = events.get_final_message()
        assert kinds.count("content_block_start") == 1
    else:
        message = clients["caller"].messages.create(max_tokens=whole - 5, **request)
    assert blocks(message) == [("tool_use", *WEATHER_CALL)] and message.stop_reason == "max_tokens"


def test_a_named_tool_is_one_call_though_the_model_would_write_two(clients):
    message = clients["caller"].messages.create(model="tiny", max_tokens=128, messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice={"type": "tool", "name": "get_weather"})
    assert blocks(message) == [("tool_use", *WEATHER_CALL)] and message.stop_reason == "tool_use"


@pytest.mark.parametrize("thinking, shown", [({"type": "enabled", "budget_tokens": 1024}, True),
                                             ({"type": "adaptive"}, True), ({"type": "disabled"}, False),
                                             (None, False)])
def test_thinking_comes_back_as_a_thinking_block_when_enabled_or_adaptive(clients, thinking, shown):
    message = clients["thinker"].messages.create(model="tiny", max_tokens=128, messages=ASK, tools=[WEATHER],
                                                 **({"thinking": thinking} if thinking else {}))
    assert blocks(message) == [("thinking", REASONING)] * shown + [("tool_use", *WEATHER_CALL)]


def test_what_claude_code_sends_is_taken(servers):
    """A first request as Claude Code 2.1 sends it: its own model name, system blocks with cache_control,
    a system turn inside messages, adaptive thinking, context management, effort, metadata, beta headers, an
    Anthropic server tool, and a max_tokens beyond the context."""
    notes = []
    server = servers["caller"]
    server.service.access_log = notes.append
    body = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 32000,
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "system", "content": "The user's shell is bash."},
                         {"role": "user", "content": [{"type": "text", "text": ASK[0]["content"],
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "tools": [WEATHER, TIME, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": "user_1"}, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"}
    try:
        with httpx.stream("POST", f"{server.url}/v1/messages?beta=true", json=body, headers=headers,
                          timeout=60) as response:
            assert response.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        server.service.access_log = None
    assert events[0]["message"]["model"] == "tiny"
    calls = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(c["id"], c["name"]) for c in calls] == [WEATHER_CALL[:2], TIME_CALL[:2]]
    assert any("web_search" in note and "left out" in note for note in notes), notes
    # The system turn is rendered where it stands, as Kimi's template renders system turns.
    tokenizer = server.tokenizer
    conversation = [{"role": "system", "content": "You are Claude Code."}, *[
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
        for m in body["messages"]]]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tools=[
        {"type": "function", "function": {"name": t["name"], **({"description": t["description"]}
                                                                if "description" in t else {}),
                                          "parameters": t["input_schema"]}} for t in (WEATHER, TIME)])
    assert events[0]["message"]["usage"]["input_tokens"] == len(tokenizer.encode(rendered, parse_special=True))


def test_a_stop_sequence_is_named(clients):
    message = clients["talker"].messages.create(model="tiny", max_tokens=64, messages=ASK,
                                                stop_sequences=["sunny"])
    assert blocks(message) == [("text", "It is ")]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "sunny"


def test_the_key_as_a_bearer_token_too(servers):
    body = {"model": "tiny", "max_tokens": 8, "messages": ASK}
    url = f"{servers['talker'].url}/v1/messages"
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    refused = httpx.post(url, json=body, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("change, status, words", [
    ({"max_tokens": None}, 400, "max_tokens"),
    ({"messages": ASK + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                         "content": "x"}]}]}, 400, "no earlier assistant tool_use"),
    ({"tools": [{"name": "get weather", "input_schema": {"type": "object"}}]}, 400, "letters"),
    ({"tool_choice": {"type": "tool", "name": "get_time"}, "tools": [WEATHER]}, 400, "not among the declared tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "images are not supported yet"),
    ({"messages": ASK + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather",
                                                            "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                       "content": [{"type": "image", "source": {}}]}]}]},
     400, "images are not supported yet"),
    ({"tools": [{"name": "get_weather"}]}, 400, "needs an 'input_schema'"),
])
def test_errors_have_anthropic_shape(servers, change, status, words):
    body = {"model": "tiny", "max_tokens": 8, "messages": ASK, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{servers['talker'].url}/v1/messages", json=body, headers={"x-api-key": KEY})
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and words in error["error"]["message"], error
    assert error["error"]["type"] == "invalid_request_error"


def test_the_client_raises_its_own_error_types(clients):
    with pytest.raises(anthropic.BadRequestError) as error:
        clients["talker"].messages.create(model="tiny", max_tokens=8, messages=[])
    assert error.value.body["error"]["type"] == "invalid_request_error" and "messages" in error.value.message
