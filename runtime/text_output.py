"""Generated tokens -> text deltas for a client: stop strings, held-back partial text, reasoning split,
tool calls.

A stop string may arrive split across tokens, so any tail of the text that could still become one is
held back until the next token decides; the stop string itself is never returned. Tokens between
<think> and </think> (Kimi's reasoning) go to `reasoning` instead of `content`. With tools declared, a
tool-call section goes to a ToolCallParser (tool_calls.py) and comes back as its complete calls, never as
marker text, with one exception: a section that breaks the format before any call is complete comes back as
text, so that nothing is lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .tokenizer import Tokenizer
from .tool_calls import ToolCallDelta, ToolCallParser

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class TextDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __add__(self, other: TextDelta) -> TextDelta:
        return TextDelta(self.content + other.content, self.reasoning + other.reasoning,
                         self.tool_calls + other.tool_calls)


def reasoning_markers(tokenizer: Tokenizer, chat_template: str | None) -> tuple[int, int] | None:
    """The ids of <think> and </think> when the chat template emits reasoning that way, else None."""
    if not chat_template or THINK_OPEN not in chat_template:
        return None
    ids = tokenizer.encode(THINK_OPEN, parse_special=True), tokenizer.encode(THINK_CLOSE, parse_special=True)
    if any(len(i) != 1 for i in ids):
        return None
    return ids[0][0], ids[1][0]


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), hidden_tokens: frozenset[int] = frozenset(),
                 reasoning: tuple[int, int] | None = None, in_reasoning: bool = False,
                 tools: ToolCallParser | None = None):
        """hidden_tokens: ids that produce no text (end-of-generation tokens). reasoning: (<think>, </think>)
        ids to split on; in_reasoning: the prompt already opened <think>. tools: the parser for a tool-call
        section, if the request declared tools."""
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
        self._hidden = hidden_tokens
        self._reasoning = reasoning
        self._in_reasoning = in_reasoning and reasoning is not None
        self.tools = tools
        self._in_tools = False
        self._forced = TextDelta()  # what tokens the prompt wrote for the model gave, for the next delta
        self._pending = ""  # decoded text not yet returned
        self.stopped = False  # a stop string was found; nothing more will be returned
        self.stop_string: str | None = None  # which one

    def force(self, tokens: Sequence[int]) -> None:
        """Tokens the prompt wrote at the start of the reply (a forced tool call): read as if generated,
        their delta comes with the first generated token's."""
        for token in tokens:
            self._forced = self._forced + self.add(token)

    def add(self, token: int) -> TextDelta:
        forced, self._forced = self._forced, TextDelta()
        return forced + self._add(token) if forced else self._add(token)

    def _add(self, token: int) -> TextDelta:
        if self._in_tools:
            return self._tool_token(token)
        if self.stopped or token in self._hidden:
            return TextDelta()
        # One section per reply: another after it (or after a broken one) is text.
        if self.tools is not None and token == self.tools.markers.section_begin and not (
                self.tools.calls or self.tools.malformed):
            delta = self._release(everything=True)
            self._in_tools = True
            return delta
        if self._reasoning is not None and token in self._reasoning:
            delta = self._release(everything=True)
            self._in_reasoning = token == self._reasoning[0]
            return delta
        self._pending += self._decoder.add(token)
        return self._release(everything=False)

    def finish(self) -> TextDelta:
        """Everything still held back (the generation is over)."""
        forced, self._forced = self._forced, TextDelta()
        return forced + self._finish() if forced else self._finish()

    def _finish(self) -> TextDelta:
        if self._in_tools:  # a call the generation cut off (max_tokens) is dropped; complete ones went out
            return TextDelta()
        if self.stopped:
            return TextDelta()
        self._pending += self._decoder.flush()
        return self._release(everything=True)

    @property
    def called_tools(self) -> bool:
        """Whether the reply is tool calls (finish_reason "tool_calls")."""
        return self.tools is not None and bool(self.tools.calls)

    def _tool_token(self, token: int) -> TextDelta:
        """A token of the tool-call section. A section that breaks the format before any call is complete
        comes back whole as content, and what follows it is text again; one that breaks after complete calls
        ends the reply at them (a stream has sent them already: the section's text would repeat them)."""
        tools = self.tools
        deltas = tools.add(token) if token not in self._hidden else []
        if tools.malformed and not tools.calls:
            self._in_tools = False
            return TextDelta(content=tools.text)
        if tools.closed or tools.malformed:
            self._in_tools = False
            self.stopped = tools.single or bool(tools.malformed)  # one call was asked for, or the rest is broken
        return TextDelta(tool_calls=deltas)

    def _release(self, everything: bool) -> TextDelta:
        text, self._pending = self._pending, ""
        found = [(i, stop) for stop in self._stop for i in [text.find(stop)] if i >= 0]
        if found:
            at, self.stop_string = min(found)
            text, self.stopped = text[:at], True
        elif not everything:
            held = self._stop_prefix_length(text)
            text, self._pending = text[:len(text) - held], text[len(text) - held:]
        return TextDelta(reasoning=text) if self._in_reasoning else TextDelta(content=text)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of text that is the start of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
