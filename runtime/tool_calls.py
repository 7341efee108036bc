"""Kimi K2's tool calls in generated tokens, as llama.cpp's chat parser for Kimi K2 reads them:

    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{JSON arguments}<|tool_call_end|>
      ... more calls ...
    <|tool_calls_section_end|>

The markers are single special tokens; a call's id (functions.NAME:INDEX, which the chat template renders back
as the call's id in later turns) and its arguments are text between them. The id a call gets back is minted,
not copied: its INDEX counts the conversation's calls (the parser's first_index is how many came before), so
ids never repeat within a conversation even when the model writes the same one every turn. A ToolCallParser
takes the tokens after <|tool_calls_section_begin|> and gives back each call once it is complete and checked,
so that a client never receives a call that turns out broken. What the text stream (text_output.py) makes of a
section that breaks the format (an id that is not functions.NAME:INDEX, a function nobody declared, arguments
that are not a JSON object): before any call is complete, it is given back as its text, so that nothing is lost;
after complete calls, which a stream has already sent, the section ends at them. A call the generation cuts off
(max_tokens) is dropped: only complete calls ever leave the parser.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .tokenizer import Tokenizer

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
CALL_ID = re.compile(r"\s*(?:functions\.)?(?P<name>[A-Za-z0-9_.\-]+):(?P<index>\d+)\s*")


@dataclass(frozen=True)
class ToolCallMarkers:
    """The ids of the five marker tokens."""
    section_begin: int
    section_end: int
    call_begin: int
    argument_begin: int
    call_end: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ToolCallMarkers | None:
        """The markers, when the vocabulary has each as one token (Kimi's has), else None."""
        ids = [tokenizer.encode(text, parse_special=True, add_bos=False)
               for text in (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)]
        if any(len(i) != 1 for i in ids):
            return None
        return cls(*(i[0] for i in ids))


@dataclass
class ToolCallDelta:
    """A piece of a streamed call, as OpenAI streams them: its id and name come once, in its first piece."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    index: int
    id: str  # functions.NAME:INDEX, INDEX counting every call of the conversation
    name: str
    arguments: str  # a JSON object's text


@dataclass
class ToolCallParser:
    """Tokens after <|tool_calls_section_begin|> -> calls. `add` returns the deltas a token completes;
    `malformed` says whether the section broke the format, and `text` is the section as text."""
    tokenizer: Tokenizer
    markers: ToolCallMarkers
    tool_names: frozenset[str]  # the functions the request declared
    single: bool = False  # one call at most (OpenAI's parallel_tool_calls: false): the section ends after it
    first_index: int = 0  # calls earlier in the conversation: this reply's are numbered on from there
    calls: list[ToolCall] = field(default_factory=list)
    malformed: str | None = None  # what was wrong, once the section broke the format
    closed: bool = False  # <|tool_calls_section_end|> was seen
    _tokens: list[int] = field(default_factory=list)  # everything, to give back as text if malformed
    _state: str = "between"  # between calls, "id", "arguments"
    _id_tokens: list[int] = field(default_factory=list)
    _argument_tokens: list[int] = field(default_factory=list)
    _name: str = ""  # the open call's function

    def add(self, token: int) -> list[ToolCallDelta]:
        if self.closed or self.malformed:
            self._tokens.append(token)
            return []
        self._tokens.append(token)
        m = self.markers
        if self._state == "between":
            if token == m.call_begin:
                self._state, self._id_tokens = "id", []
            elif token == m.section_end:
                self.closed = True
            elif self.tokenizer.decode([token]).strip():
                self._break("text between tool calls")
            return []
        if self._state == "id":
            if token == m.argument_begin:
                return self._open_call()
            if token in (m.call_begin, m.call_end, m.section_begin, m.section_end):
                self._break("a tool call without <|tool_call_argument_begin|>")
                return []
            self._id_tokens.append(token)
            return []
        # arguments
        if token == m.call_end:
            return self._close_call()
        if token in (m.call_begin, m.argument_begin, m.section_begin, m.section_end):
            self._break("a tool call's arguments cut off by another marker")
            return []
        self._argument_tokens.append(token)
        return []

    @property
    def text(self) -> str:
        """The section as the model wrote it, markers included."""
        return self.tokenizer.decode([self.markers.section_begin, *self._tokens])

    def _open_call(self) -> list[ToolCallDelta]:
        call_id = self.tokenizer.decode(self._id_tokens)
        match = CALL_ID.fullmatch(call_id)
        if match is None:
            self._break(f"a tool call id {call_id!r} that is not functions.NAME:INDEX")
        elif match["name"] not in self.tool_names:
            self._break(f"a call of {match['name']!r}, which the request did not declare")
        else:
            self._state, self._argument_tokens, self._name = "arguments", [], match["name"]
        return []

    def _close_call(self) -> list[ToolCallDelta]:
        text = self.tokenizer.decode(self._argument_tokens)
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as e:
            self._break(f"arguments that are not JSON ({e})")
            return []
        if not isinstance(arguments, dict):
            self._break("arguments that are not a JSON object")
            return []
        index = len(self.calls)
        call = ToolCall(index, f"functions.{self._name}:{self.first_index + index}", self._name, text)
        self.calls.append(call)
        self._state = "between"
        self.closed = self.single
        return [ToolCallDelta(call.index, call.id, call.name, call.arguments)]

    def _break(self, what: str) -> None:
        self.malformed = f"the model wrote {what}"
