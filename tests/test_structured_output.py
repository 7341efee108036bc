"""Structured output: answers held to a JSON schema (OpenAI's response_format, Anthropic's output_config) and
strict tools' arguments held to their parameters, by constrained decoding, through the real `openai` and
`anthropic` clients. The random-weight model would write anything; with a schema, what it writes always parses
and validates (checked with jsonschema, not with the grammar library), over many seeds, many at once in one
batch. A schema the library refuses is a 400 naming the field; a sequence without a schema gets the tokens it
would get alone."""
from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.engine import Engine, Request
from runtime.grammar import GrammarTokenizer
from runtime.sampling import SamplingParams
from tests.scripted_models import ASK, REASONING, scripted_servers, write_scripted_models
from tests.test_api import KEY, parts, start_server, stop_server  # noqa: F401 (parts: a fixture)

CONTEXT = 1024
# Bounded strings, integers and arrays: a random model cannot run past max_tokens inside a value (the digits
# of a number are unbounded, whatever its range).
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "color", "tags", "ok", "home"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
                         "ok": {"type": "boolean"},
                         "home": {"type": "object", "additionalProperties": False, "required": ["x"],
                                  "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}}}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 8}}}
STRICT_WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": CITY}}
SEEDS = range(12)


@pytest.fixture(scope="module")
def server(parts):  # noqa: F811
    server = start_server(*parts, context=CONTEXT, max_sequences=16)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def at_once(call, seeds) -> list:
    """call(seed) for every seed in parallel, so that the requests share the engine's batches."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(call, seeds))


def test_schema_answers_always_parse_and_validate(client):
    def answer(seed):
        reply = client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=300, temperature=1,
                                               response_format=person_format(strict=seed % 2 == 0))
        return reply.choices[0]
    for choice in at_once(answer, list(SEEDS)):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({choice.message.content for choice in at_once(answer, [0, 1, 2])}) > 1, "the seeds still differ"


def test_streamed_schema_answers_and_completions_validate(client):
    chunks = client.chat.completions.create(model="tiny", messages=ASK, seed=5, max_tokens=300, stream=True,
                                            response_format=person_format())
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)
    completion = client.completions.create(model="tiny", prompt="A person:", seed=3, max_tokens=300,
                                           extra_body={"response_format": person_format()})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_json_object_answers_are_objects(client):
    """Any JSON object: a random model may fill it past max_tokens (it writes long strings: about one answer in
    fifteen ends within 300 tokens), but what ends, ends as an object. Seeds are asked a dozen at a time until
    some answers have ended."""
    def answer(seed):
        return client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=300,
                                              response_format={"type": "json_object"}).choices[0]
    choices, finished = [], []
    for first in range(0, 240, len(SEEDS)):
        choices += at_once(answer, [first + seed for seed in SEEDS])
        finished = [c for c in choices if c.finish_reason == "stop"]
        if len(finished) >= 2:
            break
    assert finished, [c.message.content for c in choices]
    assert all(isinstance(json.loads(c.message.content), dict) for c in finished)
    assert all(c.message.content.startswith("{") for c in choices)


def test_strict_tool_arguments_validate(client):
    def call(seed):
        return client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=100,
                                              tools=[STRICT_WEATHER], tool_choice="required",
                                              parallel_tool_calls=False).choices[0]
    for choice in at_once(call, list(SEEDS)):
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice.message
        function = choice.message.tool_calls[0].function
        assert function.name == "get_weather"
        jsonschema.validate(json.loads(function.arguments), CITY)


@pytest.mark.parametrize("change, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}),
     "response_format.json_schema.schema", "cannot be enforced"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}),
     "response_format.json_schema.schema", "nowhere"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema", "needs 'json_schema'"),
    (dict(response_format={"type": "yaml"}), "response_format.type", "json_schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "strict": True,
                                                    "parameters": {"type": "object", "properties": {"a": 5}}}}]),
     "tools[0].function.parameters", "cannot be enforced"),
])
def test_schemas_the_grammar_library_refuses_are_400s_naming_the_field(client, change, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 2, **change})
    body = error.value.body
    assert body["param"] == param and words in body["message"], body


def test_a_sequence_without_a_schema_gets_its_own_tokens_beside_constrained_ones(server):
    """In one batch: constrained sequences and a free one; the free one's tokens are those it gets alone, and
    its logprobs are the model's (up to rounding that depends on the batch's rows); a constrained one's logprobs are
    the model's too, from before the mask."""
    tokenizer = server.tokenizer
    prompt = tuple(tokenizer.encode(tokenizer.apply_chat_template(ASK, add_generation_prompt=True), True))
    compact = {**PERSON, "x-guidance": {"whitespace_flexible": False}}  # no room for endless blanks
    grammar = GrammarTokenizer(tokenizer).compile("start: answer\nanswer: %json " + json.dumps(compact))
    free = Request(prompt, 24, SamplingParams(), tokenizer.eog_ids, top_logprobs=0)
    constrained = Request(prompt, 300, SamplingParams(temperature=1, seed=1), tokenizer.eog_ids, top_logprobs=0,
                          grammar=grammar)
    alone = run(server.model, [free])[0]
    together = run(server.model, [constrained, free, constrained])
    assert [o.token for o in together[1]] == [o.token for o in alone]
    np.testing.assert_allclose([o.logprob for o in together[1]], [o.logprob for o in alone], atol=1e-5)
    for outputs in (together[0], together[2]):
        jsonschema.validate(json.loads(tokenizer.decode([o.token for o in outputs[:-1]])), PERSON)
        assert outputs[-1].token in tokenizer.eog_ids and outputs[-1].finish_reason == "stop"
    # the logprob of a forced token (e.g. '{') under the model is below 0; a masked row would say 0
    assert all(np.isfinite(o.logprob) for o in together[0]) and together[0][0].logprob < 0


def run(model, requests: list[Request]) -> list[list]:
    engine = Engine(model, CONTEXT)
    outputs = [[] for _ in requests]
    for request, sink in zip(requests, outputs):
        engine.submit(request, sink.append)
    while engine.step():
        pass
    return outputs


# ---- a thinking model, and Anthropic's API ----

@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    with scripted_servers(write_scripted_models(tmp_path_factory.mktemp("scripted")), CONTEXT) as servers:
        yield servers


def test_a_thinking_model_reasons_freely_then_answers_in_the_schema(scripted):
    client = openai.OpenAI(base_url=f"{scripted['thinker'].url}/v1", api_key=KEY, max_retries=0)
    answer = {"type": "object", "additionalProperties": False, "required": ["answer"],
              "properties": {"answer": {"enum": ["yes", "no"]}}}
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=64, temperature=0,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "a", "schema": answer}})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == REASONING and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), answer)


def test_anthropic_output_format_and_strict_tools(scripted):
    client = anthropic.Anthropic(base_url=scripted["talker"].url, api_key=KEY, max_retries=0)
    message = client.messages.create(model="tiny", max_tokens=300, messages=ASK,
                                     output_config={"format": {"type": "json_schema", "schema": PERSON}})
    assert message.stop_reason == "end_turn" and [b.type for b in message.content] == ["text"]
    jsonschema.validate(json.loads(message.content[0].text), PERSON)
    weather = {"name": "get_weather", "strict": True, "input_schema": {**CITY, "properties": {
        "city": {"enum": ["Oslo", "Lima"]}}}}
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, tools=[weather],
                                     tool_choice={"type": "tool", "name": "get_weather"})
    assert message.stop_reason == "tool_use" and message.content[0].input["city"] in ("Oslo", "Lima")
    with pytest.raises(anthropic.BadRequestError) as error:
        client.messages.create(model="tiny", max_tokens=8, messages=ASK,
                               output_config={"format": {"type": "json_schema", "schema": {"type": "frob"}}})
    assert "output_config.format.schema" in error.value.body["error"]["message"]


def test_strict_tools_leave_the_models_own_calls_as_they_are(scripted):
    """The caller spells its calls with the vocabulary's multi-character tokens, not always as the tokenizer
    would split the same text ('"', 'ci', 'ty'); under strict tools its two calls come back unchanged."""
    client = openai.OpenAI(base_url=f"{scripted['caller'].url}/v1", api_key=KEY, max_retries=0)
    zone = {"type": "object", "additionalProperties": False, "required": ["zone"],
            "properties": {"zone": {"type": "string"}}}
    tools = [STRICT_WEATHER, {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": zone}}]
    message = client.chat.completions.create(model="tiny", messages=ASK, tools=tools, temperature=0).choices[0].message
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}), ("functions.get_time:1", "get_time",
                                                                      {"zone": "UTC"})]


@pytest.mark.parametrize("call_id, arguments", [
    ("functions.get_weather:0", '{"city": "Paris"}'),
    ("get_weather:7", '{"city": "Paris"}'),  # the parser reads an id without "functions." too
    ("functions.get_weather:123456", '{"city": "Paris"}\n'),
])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(splits=st.data())
def test_every_call_the_parser_reads_fits_a_strict_tools_grammar_however_it_is_split(server, call_id, arguments,
                                                                                     splits):
    """A strict tool must never turn a call the model writes, and the parser reads, into another: every token of
    every split of the call into the vocabulary's tokens is allowed by the grammar's mask where it comes."""
    from cluster.server import structured_output
    from cluster.server.tool_use import Tool, ToolChoice
    from runtime.tool_calls import ToolCallMarkers
    tokenizer, service = server.tokenizer, server.service
    markers = ToolCallMarkers.of(tokenizer)
    tool = Tool("get_weather", None, CITY, strict=True)
    grammar = structured_output.reply_grammar(service, None, [tool], ToolChoice("auto"), True, markers, None, False,
                                              [])
    matcher = grammar.matcher()
    tokens = [markers.section_begin, markers.call_begin, *random_split(call_id, tokenizer, splits),
              markers.argument_begin, *random_split(arguments, tokenizer, splits), markers.call_end,
              markers.section_end, sorted(tokenizer.eog_ids)[0]]
    for token in tokens:
        row = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        matcher.apply(row)
        assert np.isfinite(row[token]), f"{tokenizer.token_bytes(token)!r} masked in {tokens}"
        matcher.accept(token)


def random_split(text: str, tokenizer, data) -> list[int]:
    """`text` as a random sequence of the vocabulary's (non-special) tokens."""
    raw, tokens = text.encode(), []
    while raw:
        fitting = [t for t in tokens_by_first_byte(tokenizer)[raw[0]] if raw.startswith(tokenizer.token_bytes(t))]
        token = data.draw(st.sampled_from(fitting))
        tokens.append(token)
        raw = raw[len(tokenizer.token_bytes(token)):]
    return tokens


@functools.cache
def tokens_by_first_byte(tokenizer) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for token in range(tokenizer.vocab_size):
        if token not in tokenizer.special_ids and tokenizer.token_bytes(token):
            found.setdefault(tokenizer.token_bytes(token)[0], []).append(token)
    return found
