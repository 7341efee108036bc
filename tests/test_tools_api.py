"""Tools on /v1/chat/completions through the real `openai` client: the declared tools and a history of calls
and results reach the chat template; tool_choice steers (a forced call is written into the prompt; "none"
bans the section); bad definitions and orphan results are 400s naming the field; a call the model botches
comes back as text. (Calls the model writes itself, parsed and streamed: tests/test_tool_calls.py.)"""
from __future__ import annotations

import numpy as np
import openai
import pytest

from runtime.engine import Engine, Request
from runtime.sampling import SamplingParams
from tests.test_api import KEY, parts, start_server, stop_server  # noqa: F401 (parts: a fixture)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ID = "functions.get_weather:0"
CONTEXT = 1024  # the tools' declarations are long
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C, clear"}]


@pytest.fixture(scope="module")
def server(parts):  # noqa: F811
    server = start_server(*parts, context=CONTEXT, max_sequences=4)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def greedy_reply(server, messages, max_tokens: int, **template_vars) -> tuple[int, str]:
    """Prompt length and reply text of the engine alone on the template's rendering."""
    tokenizer = server.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_vars),
                              True)
    tokens = Engine(server.model, CONTEXT).generate(prompt, max_tokens, stop_tokens=tokenizer.eog_ids)
    return len(prompt), tokenizer.decode([t for t in tokens if t not in tokenizer.eog_ids])


@pytest.mark.parametrize("messages", [ASK, HISTORY], ids=["question", "call and result"])
def test_tools_and_tool_history_reach_the_template(server, client, messages):
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=6,
                                           temperature=0)
    length, text = greedy_reply(server, messages, 6, tools=[WEATHER, TIME])
    assert reply.usage.prompt_tokens == length > greedy_reply(server, messages, 1)[0], "the tools are in the prompt"
    assert reply.choices[0].message.content == text and reply.choices[0].message.tool_calls is None
    rendered = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=[WEATHER])
    assert "tool_declare" in rendered and (messages is ASK or f"## Return of {CALL_ID}" in rendered)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_the_model_botches_comes_back_as_text(client, stream):
    """tool_choice names a function: the reply starts inside its call. The random-weight model writes no JSON
    object in 8 tokens, so the section is given back as text, never as a 500 or a broken call."""
    request = dict(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **request))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**request).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        assert choice.message.tool_calls is None
    assert content.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                              "<|tool_call_argument_begin|>")
    assert finish in ("length", "stop")


def test_required_starts_an_open_call(client):
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=4,
                                            temperature=0, tool_choice="required").choices[0]
    assert choice.message.content.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.")


def test_tool_choice_none_never_samples_a_section(server):
    """The ban, on the engine: the token greedy decoding picks first is banned, and another comes instead."""
    prompt = server.tokenizer.encode("Call a tool now", True)
    engine = Engine(server.model, CONTEXT)
    first = next(iter(engine.generate(prompt, 1)))
    outputs = []
    engine.submit(Request(tuple(prompt), 1, SamplingParams(), banned_tokens=frozenset({first})), outputs.append)
    while engine.busy:
        engine.step()
    assert outputs[0].token != first


@pytest.mark.parametrize("change, param, words", [
    (dict(tools=[{"type": "retrieval", "function": WEATHER["function"]}]), "tools.0.type", "function"),
    (dict(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].name", "letters"),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].name", "unique"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].parameters", "object"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice",
     "not among the declared tools"),
    (dict(tool_choice="required"), "tool_choice", "declares no tools"),
    (dict(tools=[{"type": "function", "function": {**WEATHER["function"], "strict": True}}]),
     "tools[0].function.strict", "not supported yet"),
    (dict(messages=ASK + [{"role": "tool", "tool_call_id": "functions.get_time:3", "content": "noon"}]),
     "messages[1].tool_call_id", "no earlier assistant"),
    (dict(messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function"}]}]),
     "messages[1].tool_calls[0]", "'name' and 'arguments'"),
])
def test_bad_tools_are_400s_naming_the_field(client, change, param, words):
    request = {"model": "tiny", "messages": ASK, "max_tokens": 2, **change}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    body = error.value.body
    assert body["param"] == param and words in body["message"], body


def test_banned_logits_are_minus_infinity_for_logprobs(server, client):
    """With tool_choice none, the section marker has no probability at all."""
    marker = server.tokenizer.encode("<|tool_calls_section_begin|>", parse_special=True, add_bos=False)[0]
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=3, temperature=0, logprobs=True, top_logprobs=20)
    assert reply.choices[0].message.tool_calls is None
    tokens = {t.token for entry in reply.choices[0].logprobs.content for t in entry.top_logprobs}
    assert server.tokenizer.decode([marker]) not in tokens and np.isfinite(
        [entry.logprob for entry in reply.choices[0].logprobs.content]).all()
