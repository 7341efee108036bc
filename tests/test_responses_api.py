"""OpenAI's Responses API (what Codex CLI and the Agents SDK speak) through the real `openai` client, on scripted
models that answer in words, call tools or reason (tests/scripted_models.py): output items, function calls and
their outputs in the input, previous_response_id, the streamed events in order, reasoning summaries, JSON
schemas, tools the server cannot run left out, and OpenAI's error shape."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.scripted_models import ASK, REASONING, SPOKEN, TIME_CALL, WEATHER_CALL, servers  # noqa: F401 (a fixture)
from tests.test_api import KEY

QUESTION = ASK[0]["content"]
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {}}}}
BOTH_CALLS = [(call_id, name, arguments) for call_id, name, arguments in (WEATHER_CALL, TIME_CALL)]
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def clients(servers):
    return {name: openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
            for name, server in servers.items()}


def calls(response) -> list[tuple]:
    return [(item.call_id, item.name, json.loads(item.arguments)) for item in response.output
            if item.type == "function_call"]


def results(response) -> list[dict]:
    """The response's calls and an output for each, as the next request's input items."""
    items = [{"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
             for item in response.output if item.type == "function_call"]
    return items + [{"type": "function_call_output", "call_id": item["call_id"], "output": "done"} for item in items]


def test_a_reply_in_words_under_any_model_name(clients):
    response = clients["talker"].responses.create(model="gpt-5-codex", input=QUESTION)
    assert response.output_text == SPOKEN and response.status == "completed" and response.model == "tiny"
    assert [item.type for item in response.output] == ["message"]
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.input_tokens_details.cached_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_function_calls_come_back_as_items_and_other_tools_are_left_out(servers, clients):
    notes = []
    servers["caller"].service.access_log = notes.append
    try:
        response = clients["caller"].responses.create(
            model="tiny", input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
            instructions="Use the tools.", tools=[WEATHER, TIME, {"type": "web_search"}])
    finally:
        servers["caller"].service.access_log = None
    assert calls(response) == BOTH_CALLS and response.status == "completed"
    assert any("web_search" in note for note in notes), notes


def test_outputs_in_the_input_and_previous_response_id_go_on_with_the_conversation(clients):
    first = clients["caller"].responses.create(model="tiny", input=QUESTION, tools=[WEATHER, TIME])
    whole = clients["caller"].responses.create(model="tiny", tools=[WEATHER, TIME], store=False,
                                               input=[{"role": "user", "content": QUESTION}, *results(first)])
    outputs_only = [item for item in results(first) if item["type"] == "function_call_output"]
    continued = clients["caller"].responses.create(model="tiny", tools=[WEATHER, TIME], input=outputs_only,
                                                   previous_response_id=first.id)
    # The model writes functions.get_weather:0 again; ids count the conversation's calls.
    expected = [(f"functions.{name}:{2 + i}", name, arguments) for i, (_, name, arguments) in enumerate(BOTH_CALLS)]
    assert calls(whole) == calls(continued) == expected
    assert continued.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as missing:
        clients["caller"].responses.create(model="tiny", input="hi", previous_response_id=whole.id)  # not stored
    assert missing.value.body["param"] == "previous_response_id"


def test_streamed_events_come_in_the_order_openais_clients_parse(servers, clients):
    with httpx.stream("POST", f"{servers['caller'].url}/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "input": QUESTION, "tools": [WEATHER, TIME], "stream": True}) as stream:
        events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    call = ["response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done"]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", *call, *call,
                                           "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:  # each as the client's own types define it, required fields and all
        STREAM_EVENT.validate_python(event)
    with clients["caller"].responses.stream(model="tiny", input=QUESTION, tools=[WEATHER, TIME]) as stream:
        streamed = stream.get_final_response()
    assert calls(streamed) == BOTH_CALLS == calls(type(streamed).model_validate(events[-1]["response"]))
    with clients["talker"].responses.stream(model="tiny", input=QUESTION) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == SPOKEN


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_comes_back_as_a_reasoning_item_with_its_summary(clients, stream):
    request = {"model": "tiny", "input": QUESTION, "tools": [WEATHER], "reasoning": {"summary": "auto"}}
    if stream:
        with clients["thinker"].responses.stream(**request) as events:
            types = [e.type for e in events]
            response = events.get_final_response()
        assert types.index("response.reasoning_summary_text.delta") < types.index("response.output_item.done")
        Response.model_validate(response.model_dump())
    else:
        response = clients["thinker"].responses.create(**request)
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].summary[0].text == REASONING and calls(response) == [BOTH_CALLS[0]]
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens


def test_a_json_schema_answer_follows_its_schema(clients):
    schema = {"type": "object", "properties": {"sky": {"enum": ["clear", "cloudy"]}}, "required": ["sky"],
              "additionalProperties": False}
    response = clients["talker"].responses.create(model="tiny", input=QUESTION, max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert response.status == "completed" and json.loads(response.output_text)["sky"] in ("clear", "cloudy")


def test_max_output_tokens_leaves_the_response_incomplete(clients):
    response = clients["talker"].responses.create(model="tiny", input=QUESTION, max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_cut_by_max_output_tokens_is_dropped_and_the_complete_one_stays(clients, stream):
    """The caller writes two calls; max_output_tokens ends its reply inside the second's arguments."""
    request = {"model": "tiny", "input": QUESTION, "tools": [WEATHER, TIME]}
    whole = clients["caller"].responses.create(**request).usage.output_tokens
    if stream:
        # The client's stream helper waits for response.completed; an incomplete response ends otherwise.
        events = list(clients["caller"].responses.create(stream=True, max_output_tokens=whole - 5, **request))
        assert [e.type for e in events].count("response.output_item.added") == 1
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = clients["caller"].responses.create(max_output_tokens=whole - 5, **request)
    assert [item.type for item in response.output] == ["function_call"] and calls(response) == BOTH_CALLS[:1]
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_a_named_function_is_one_call_though_the_model_would_write_two(clients):
    response = clients["caller"].responses.create(model="tiny", input=QUESTION, tools=[WEATHER, TIME],
                                                  tool_choice={"type": "function", "name": "get_weather"})
    assert calls(response) == BOTH_CALLS[:1] and response.status == "completed"


@pytest.mark.parametrize("body, param, words", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "images are not supported yet"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                             {"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[1].type", "images are not supported yet"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "'input_file' is not supported"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "x"}]}, "input[0].call_id",
     "no earlier function_call"),
    ({"input": [{"type": "computer_call", "id": "c"}]}, "input[0].type", "not supported"),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nowhere"}, "tools": [WEATHER]}, "tool_choice",
     "not among the declared tools"),
])
def test_bad_input_gets_openais_error_shape(servers, body, param, words):
    response = httpx.post(f"{servers['talker'].url}/v1/responses", json={"model": "tiny", **body},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
