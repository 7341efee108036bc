"""Tools on /v1/chat/completions through the real `openai` client: the declared tools and a history of calls
and results reach the chat template; tool_choice steers (a forced call is written into the prompt; "none"
bans the section; a named function is one call); bad definitions and orphan results are 400s naming the
field; a call cut off by max_tokens is dropped, the complete ones kept, with no marker text, whole or streamed.
Calls a model writes itself come from scripted models (runtime/synthetic/scripted_model.py)
whose weights make them write a given tool-call section, so the parser meets the model's own tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest

from runtime.engine import Engine, Request
from runtime.sampling import SamplingParams
from tests.scripted_models import (ASK, REASONING, SPOKEN, TIME_CALL, WEATHER_CALL, scripted_servers,
                                   write_scripted_models)
from tests.test_api import KEY, parts, start_server, stop_server  # noqa: F401 (parts: a fixture)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
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
def test_a_forced_call_cut_by_max_tokens_leaves_nothing_broken(client, stream):
    """tool_choice names a function: the reply starts inside its call. The random-weight model writes no JSON
    object in 8 tokens, so there is no call to give, and no marker text either, never a 500 or a broken call."""
    calls, content, finish = reply(client, stream, model="tiny", messages=ASK, tools=[WEATHER], max_tokens=8,
                                   temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls == [] and not content and finish == "length"


def test_required_starts_an_open_call(server, client):
    """The prompt ends with the open call: <|tool_calls_section_begin|><|tool_call_begin|>functions."""
    request = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=4, temperature=0)
    free = client.chat.completions.create(**request)
    forced = client.chat.completions.create(tool_choice="required", **request)
    opening = server.tokenizer.encode("<|tool_calls_section_begin|><|tool_call_begin|>functions.",
                                      parse_special=True, add_bos=False)
    assert forced.usage.prompt_tokens == free.usage.prompt_tokens + len(opening)
    assert not forced.choices[0].message.content and forced.choices[0].finish_reason == "length"


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


# ---- a model that writes tool calls itself ----

@pytest.fixture(scope="module")
def scripted_models(tmp_path_factory) -> dict[str, Path]:
    return write_scripted_models(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def scripted_started(scripted_models):
    """A server on each scripted model."""
    with scripted_servers(scripted_models, CONTEXT) as servers:
        yield servers


@pytest.fixture(scope="module")
def scripted(scripted_started):
    """Each scripted model's openai client."""
    return {name: openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
            for name, s in scripted_started.items()}


def calls_of(message) -> list[tuple]:
    return [(c.id, c.type, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed_calls(chunks) -> list[tuple]:
    """The calls a stream's tool_calls deltas add up to."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for piece in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = piece.id or entry["id"]
            entry["name"] = (piece.function.name if piece.function else None) or entry["name"]
            entry["arguments"] += piece.function.arguments or ""
    return [(c["id"], "function", c["name"], json.loads(c["arguments"])) for c in calls.values()]


def reply(client, stream: bool, **request) -> tuple[list[tuple], str | None, str | None]:
    """(calls, content, finish_reason) of a chat completion, whole or streamed. Streamed, every chunk after the
    first (the role's) must carry something: no empty content while the model writes a tool call."""
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        return calls_of(choice.message), choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(stream=True, **request))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and all(d.content != "" for d in deltas[1:]), deltas
    assert all(d.content or d.tool_calls or c.choices[0].finish_reason for d, c in zip(deltas[1:], chunks[1:]))
    content = "".join(d.content or "" for d in deltas) or None
    return streamed_calls(chunks), content, chunks[-1].choices[0].finish_reason


BOTH_CALLS = [(call_id, "function", name, arguments) for call_id, name, arguments in (WEATHER_CALL, TIME_CALL)]


def test_two_parallel_calls_the_model_writes_come_back_parsed(scripted):
    choice = scripted["caller"].chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                        temperature=0).choices[0]
    assert calls_of(choice.message) == BOTH_CALLS
    assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_streamed_calls_come_as_openai_streams_them(scripted):
    calls, content, finish = reply(scripted["caller"], True, model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                   temperature=0)
    assert calls == BOTH_CALLS and finish == "tool_calls"
    assert content is None, "no marker text in content"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("left", [4, 2], ids=["in the arguments", "before the end marker"])
def test_a_call_cut_by_max_tokens_is_dropped_and_the_complete_one_stays(scripted, stream, left):
    """The caller writes two calls; max_tokens ends its reply inside the second (which ends '{"zone": "UTC"}\n',
    <|tool_call_end|>, <|tool_calls_section_end|>, <|im_end|>): the first comes back as a call, never twice,
    and no marker text."""
    request = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], temperature=0)
    whole = scripted["caller"].chat.completions.create(**request).usage.completion_tokens
    calls, content, finish = reply(scripted["caller"], stream, max_tokens=whole - left - 1, **request)
    assert calls == BOTH_CALLS[:1] and content is None and finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_call_cut_by_max_tokens_leaves_no_marker_text(scripted, stream):
    calls, content, finish = reply(scripted["caller"], stream, model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                   temperature=0, max_tokens=3)
    assert calls == [] and not content and finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_one_call_though_the_model_would_write_two(scripted, stream):
    calls, content, finish = reply(scripted["caller"], stream, model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                   temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls == BOTH_CALLS[:1] and content is None and finish == "tool_calls"


def test_one_call_when_parallel_calls_are_off(scripted):
    choice = scripted["caller"].chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                        temperature=0, parallel_tool_calls=False).choices[0]
    assert calls_of(choice.message) == BOTH_CALLS[:1] and choice.finish_reason == "tool_calls"


def test_a_follow_up_turn_with_the_results_renders_and_generates(scripted):
    reply = scripted["caller"].chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                       temperature=0).choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": content}
               for call, content in zip(reply.tool_calls, ["18 C, clear", "12:00"])]
    follow_up = ASK + [reply.model_dump(exclude_none=True)] + results
    choice = scripted["caller"].chat.completions.create(model="tiny", messages=follow_up, tools=[WEATHER, TIME],
                                                        temperature=0, max_tokens=64).choices[0]
    assert choice.finish_reason == "tool_calls"
    # The model writes the same ids again; the server numbers them on from the conversation's two calls.
    assert calls_of(choice.message) == [(f"functions.{name}:{2 + i}", kind, name, arguments)
                                        for i, (_, kind, name, arguments) in enumerate(BOTH_CALLS)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_an_undeclared_function_after_a_good_one_is_left_out_with_a_note(scripted_started, scripted,
                                                                                   stream):
    """Streamed, the good call has gone out before the bad one begins: the section's text would repeat it."""
    notes = []
    scripted_started["caller"].service.access_log = notes.append
    try:
        calls, content, finish = reply(scripted["caller"], stream, model="tiny", messages=ASK, tools=[WEATHER],
                                       temperature=0)
    finally:
        scripted_started["caller"].service.access_log = None
    assert calls == BOTH_CALLS[:1] and content is None and finish == "tool_calls"
    assert any("left out the rest" in note and "'get_time', which the request did not declare" in note
               for note in notes), notes


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_required_and_named_make_a_model_that_would_answer_in_words_call(scripted, tool_choice):
    talker = scripted["talker"]
    words = talker.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                           temperature=0).choices[0]
    assert words.message.content == SPOKEN and words.message.tool_calls is None
    choice = talker.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                            tool_choice=tool_choice).choices[0]
    assert calls_of(choice.message) == [BOTH_CALLS[0]] and choice.finish_reason == "tool_calls"


def test_tool_choice_none_keeps_the_caller_in_words(scripted):
    """The caller's first token is the banned section marker: it must write something else."""
    choice = scripted["caller"].chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                        temperature=0, tool_choice="none", max_tokens=4).choices[0]
    assert choice.message.tool_calls is None and "<|tool_calls_section_begin|>" not in choice.message.content


def test_reasoning_then_a_call_from_a_thinking_model(scripted):
    """A model on Kimi K2 Thinking's template reasons, then calls: reasoning_content and tool_calls both."""
    choice = scripted["thinker"].chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                                         temperature=0).choices[0]
    assert choice.message.reasoning_content == REASONING
    assert calls_of(choice.message) == [BOTH_CALLS[0]] and choice.finish_reason == "tool_calls"


def test_chat_shows_the_calls_and_asks_for_their_results(scripted_models, tmp_path):
    """`kimi-cluster chat --tools`: each call shown, each result asked for and sent back (the caller then
    calls again; Ctrl-D at the next result ends the chat)."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, TIME]))
    session = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", str(scripted_models["caller"]),
                              "--tools", str(tools), "--context", str(CONTEXT)],
                             input=f"{ASK[0]['content']}\n18 C, clear\n12:00\n", capture_output=True, text=True,
                             timeout=120)
    assert session.returncode == 0, session.stderr
    out = session.stdout
    assert '[tool call functions.get_weather:0: get_weather({"city": "Paris"})]' in out
    assert '[tool call functions.get_time:1: get_time({"zone": "UTC"})]' in out
    assert out.count("result of get_weather> ") == 2 and out.count("result of get_time> ") == 1, out
