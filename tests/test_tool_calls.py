"""Kimi K2's tool-call sections, token by token through TextStream: calls parsed and given back as each
completes, sections that break the format before any complete call given back as text, and a call the
generation cuts off, or a break after complete calls, left out without marker text."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.synthetic.demo_vocab import demo_tokenizer_metadata
from runtime.text_output import TextDelta, TextStream
from runtime.tokenizer import Tokenizer
from runtime.tool_calls import ToolCallMarkers, ToolCallParser

TOOLS = frozenset({"get_weather", "get_time"})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(demo_tokenizer_metadata())


def section(*calls: tuple[str, str]) -> str:
    """A tool-call section as Kimi K2 writes it: (id, arguments) per call."""
    body = "".join(f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"
                   for call_id, arguments in calls)
    return f"<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


def tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The markers and <|im_end|> as their special tokens, the rest as plain text (as a model writes "[EOS]"
    inside arguments: in text tokens)."""
    specials = re.compile(r"(<\|tool_call[a-z_]*\|>|<\|im_end\|>)")
    return [token for i, part in enumerate(specials.split(text)) if part
            for token in tokenizer.encode(part, parse_special=i % 2 == 1, add_bos=False)]


def run(tokenizer: Tokenizer, text: str, single: bool = False) -> tuple[TextStream, list]:
    """Feed `text`'s tokens (and <|im_end|>) through a TextStream with tools; returns it and its deltas."""
    parser = ToolCallParser(tokenizer, ToolCallMarkers.of(tokenizer), TOOLS, single)
    stream = TextStream(tokenizer, hidden_tokens=tokenizer.eog_ids, tools=parser)
    deltas = []
    for token in tokens(tokenizer, text + "<|im_end|>"):
        deltas.append(stream.add(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return stream, deltas


def joined(deltas: list[TextDelta]) -> TextDelta:
    total = TextDelta()
    for delta in deltas:
        total = total + delta
    return total


def test_two_calls_come_back_parsed_each_when_it_completes(tokenizer):
    weather, time_args = '{"city": "Paris", "unit": "celsius"}', '{"zone": "Europe/Paris"}'
    stream, deltas = run(tokenizer, "Let me look." + section(("functions.get_weather:0", weather),
                                                             ("functions.get_time:1", time_args)))
    assert stream.called_tools and joined(deltas).content == "Let me look."
    calls = stream.tools.calls
    assert [(c.index, c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "functions.get_weather:0", "get_weather", {"city": "Paris", "unit": "celsius"}),
        (1, "functions.get_time:1", "get_time", {"zone": "Europe/Paris"})]
    given = [[(d.index, d.id, d.name, d.arguments) for d in delta.tool_calls] for delta in deltas]
    assert [g for g in given if g] == [[(c.index, c.id, c.name, c.arguments)] for c in calls]
    call_ends = [i for i, token in enumerate(tokens(tokenizer, "Let me look." + section(
        ("functions.get_weather:0", weather), ("functions.get_time:1", time_args)))) if tokenizer.decode([token]) ==
        "<|tool_call_end|>"]
    assert [i for i, g in enumerate(given) if g] == call_ends, "each call comes with its <|tool_call_end|>"


def test_ids_count_the_conversations_calls_whatever_index_the_model_writes(tokenizer):
    """Models repeat ids turn after turn (functions.Bash:0 each time); a client must never see one twice."""
    parser = ToolCallParser(tokenizer, ToolCallMarkers.of(tokenizer), TOOLS, first_index=5)
    stream = TextStream(tokenizer, hidden_tokens=tokenizer.eog_ids, tools=parser)
    for token in tokens(tokenizer, section(("functions.get_weather:0", "{}"), ("get_time:0", "{}")) + "<|im_end|>"):
        stream.add(token)
    stream.finish()
    assert [(c.index, c.id) for c in parser.calls] == [(0, "functions.get_weather:5"), (1, "functions.get_time:6")]


@pytest.mark.parametrize("text, why", [
    (section(("functions.send_mail:0", '{"to": "x"}')), "did not declare"),
    (section(("get weather", '{"city": "Paris"}')), "not functions.NAME:INDEX"),
    (section(("functions.get_weather:0", '{"city": "Par')), "not JSON"),
    (section(("functions.get_weather:0", '["Paris"]')), "not a JSON object"),
])
def test_a_section_that_breaks_the_format_comes_back_as_text(tokenizer, text, why):
    stream, deltas = run(tokenizer, "Sure. " + text)
    assert not stream.called_tools and why in stream.tools.malformed
    assert joined(deltas).content == "Sure. " + text


def cut(tokenizer: Tokenizer, text: str, max_tokens: int) -> tuple[TextStream, TextDelta]:
    """`text`'s first max_tokens tokens through a TextStream with tools, as a reply cut by max_tokens."""
    parser = ToolCallParser(tokenizer, ToolCallMarkers.of(tokenizer), TOOLS)
    stream = TextStream(tokenizer, hidden_tokens=tokenizer.eog_ids, tools=parser)
    deltas = [stream.add(token) for token in tokens(tokenizer, text)[:max_tokens]]
    return stream, joined(deltas + [stream.finish()])


def test_a_call_cut_off_is_dropped_and_the_complete_ones_stay(tokenizer):
    """max_tokens ends the reply inside its third call, or inside its only one: no marker text either way."""
    three = section(("functions.get_weather:0", '{"city": "Paris"}'), ("functions.get_time:1", "{}"),
                    ("functions.get_weather:2", '{"city": "Rome"}'))
    length = len(tokens(tokenizer, three))
    for max_tokens in (length - 4, length - 2):  # inside the third call's arguments; all but its end markers
        stream, delta = cut(tokenizer, "Let me look." + three, len(tokens(tokenizer, "Let me look.")) + max_tokens)
        assert [c.name for c in stream.tools.calls] == ["get_weather", "get_time"] and stream.called_tools
        assert [d.id for d in delta.tool_calls] == ["functions.get_weather:0", "functions.get_time:1"]
        assert delta.content == "Let me look." and not stream.tools.malformed
    stream, delta = cut(tokenizer, three, 6)
    assert not stream.called_tools and delta == TextDelta()


def test_a_break_after_complete_calls_ends_the_reply_at_them(tokenizer):
    """The calls before it may have been streamed already: the section's text would give them twice."""
    stream, deltas = run(tokenizer, section(("functions.get_time:0", "{}"), ("functions.send_mail:1", "{}")))
    assert stream.stopped and stream.called_tools and "did not declare" in stream.tools.malformed
    assert [(d.id, d.arguments) for d in joined(deltas).tool_calls] == [("functions.get_time:0", "{}")]
    assert not joined(deltas).content


def test_text_after_a_closed_section_is_content(tokenizer):
    stream, deltas = run(tokenizer, section(("functions.get_time:0", "{}")) + " done")
    assert stream.called_tools and joined(deltas).content == " done"


def test_one_call_when_parallel_calls_are_off(tokenizer):
    stream, deltas = run(tokenizer, section(("functions.get_time:0", "{}"), ("functions.get_weather:1", "{}")),
                         single=True)
    assert stream.stopped and [c.name for c in stream.tools.calls] == ["get_time"]


def test_a_forced_call_is_read_as_if_generated(tokenizer):
    parser = ToolCallParser(tokenizer, ToolCallMarkers.of(tokenizer), TOOLS)
    stream = TextStream(tokenizer, hidden_tokens=tokenizer.eog_ids, tools=parser)
    encode = lambda text: tokens(tokenizer, text)  # noqa: E731
    stream.force(encode("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
                        "<|tool_call_argument_begin|>"))
    given = [stream.add(token).tool_calls for token in encode('{"zone": "UTC"}<|tool_call_end|>'
                                                              "<|tool_calls_section_end|><|im_end|>")]
    stream.finish()
    assert [(d.id, d.name, d.arguments) for calls in given for d in calls] == [
        ("functions.get_time:0", "get_time", '{"zone": "UTC"}')]
    assert stream.called_tools and [(c.id, c.arguments) for c in parser.calls] == [
        ("functions.get_time:0", '{"zone": "UTC"}')]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.booleans())
def test_any_arguments_round_trip_in_pieces(tokenizer, arguments, ascii_only):
    text = json.dumps(arguments, ensure_ascii=ascii_only)
    stream, deltas = run(tokenizer, section(("functions.get_weather:0", text)))
    assert stream.called_tools and json.loads(stream.tools.calls[0].arguments) == arguments
    assert "".join(d.arguments for delta in deltas for d in delta.tool_calls) == text


def test_a_second_section_after_a_broken_one_is_text_once(tokenizer):
    broken = section(("functions.send_mail:0", "{}"))
    stream, deltas = run(tokenizer, broken + " and " + section(("functions.get_time:0", "{}")))
    assert not stream.called_tools
    assert joined(deltas).content == broken + " and " + section(("functions.get_time:0", "{}"))
