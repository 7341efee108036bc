"""Streamed text for clients: stop strings (also split across tokens), held-back text, reasoning split."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from runtime.synthetic.demo_vocab import demo_tokenizer_metadata
from runtime.text_output import TextDelta, TextStream, reasoning_markers
from runtime.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_metadata(demo_tokenizer_metadata("thinking"))
INSTRUCT = Tokenizer.from_metadata(demo_tokenizer_metadata("instruct"))
WORDS = ["Hello", " world", ", pooled", " memory", " 你好", " 🦙", "!", " stop", "\n\n", " END", "ing"]


def stream(tokens, **options) -> tuple[TextDelta, list[TextDelta]]:
    text_stream = TextStream(TOKENIZER, **options)
    deltas = [text_stream.add(t) for t in tokens] + [text_stream.finish()]
    return TextDelta("".join(d.content for d in deltas), "".join(d.reasoning for d in deltas)), deltas


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), st.sampled_from(["", "wor", "END", "o w", "🦙!"]))
def test_streamed_text_is_the_text_cut_at_the_first_stop_string(words, stop):
    text = "".join(words)
    tokens = TOKENIZER.encode(text, parse_special=False)
    got, deltas = stream(tokens, stop=[stop] if stop else [])
    expected = text[:text.find(stop)] if stop and stop in text else text
    assert got.content == expected
    # Nothing of the stop string ever reaches the client, not even a first character of it.
    assert "".join(d.content for d in deltas[:-1]) == expected[:len("".join(d.content for d in deltas[:-1]))]


def test_a_stop_string_split_over_tokens_is_held_back_until_decided():
    tokens = TOKENIZER.encode("one two three", parse_special=False)
    text_stream = TextStream(TOKENIZER, stop=["two three"])
    released = "".join(text_stream.add(t).content for t in tokens)
    assert released == "one " and text_stream.stopped
    assert not text_stream.finish()


def test_end_of_generation_tokens_produce_no_text():
    eos = next(iter(TOKENIZER.eog_ids))
    got, _ = stream(TOKENIZER.encode("hi", parse_special=False) + [eos], hidden_tokens=TOKENIZER.eog_ids)
    assert got.content == "hi"


def test_reasoning_between_think_tokens_goes_to_its_own_channel():
    markers = reasoning_markers(TOKENIZER, TOKENIZER.chat_template)
    assert markers is not None
    tokens = TOKENIZER.encode("<think>pool the RAM</think>The answer.", parse_special=True)
    got, _ = stream(tokens, reasoning=markers)
    assert got == TextDelta(content="The answer.", reasoning="pool the RAM")
    # A prompt that already opened <think> starts in reasoning.
    got, _ = stream(TOKENIZER.encode("hmm</think>ok", parse_special=True), reasoning=markers, in_reasoning=True)
    assert got == TextDelta(content="ok", reasoning="hmm")


def test_templates_without_think_have_no_reasoning_split():
    assert reasoning_markers(INSTRUCT, INSTRUCT.chat_template) is None
