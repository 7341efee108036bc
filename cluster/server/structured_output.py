"""Structured output, whatever the protocol: the grammar a reply must follow when a request asks for JSON of a
schema (OpenAI's response_format, Anthropic's output_config.format) or declares strict tools, enforced token by token
by constrained decoding (runtime/grammar.py).

The grammar covers the whole reply, as the chat's parsers read it:

    [[<think>] reasoning </think>]  then  the answer (JSON of its schema, or free text)
                          or    [text] <|tool_calls_section_begin|> calls <|tool_calls_section_end|>

where each call is <|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>ARGUMENTS<|tool_call_end|>,
NAME one of the declared tools and ARGUMENTS a JSON object: of the tool's parameters when the tool is strict. A
call's id takes the forms the reply's parser takes (runtime/tool_calls.py: "functions." optional, any index up
to six digits), so that the grammar does not turn a call the model writes, and the parser reads, into another.
The tool choice decides which branches exist; a forced start already in the prompt is read by the grammar first.
Requests that ask for none of this get no grammar and cost nothing.
"""
from __future__ import annotations

import json
import re
from typing import Any

from cluster.server.errors import ApiError
from cluster.server.service import Service
from cluster.server.tool_use import Tool, ToolChoice
from runtime.grammar import Grammar, GrammarError, GrammarTokenizer
from runtime.tool_calls import ToolCallMarkers

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Where the grammar leaves one way on, llguidance would otherwise allow only the tokenizer's own split of the
# bytes it forces ('"city' after '{'), and a model that spells them otherwise ('"', 'ci', 'ty') is thrown off.
EVERY_SPLIT = '%llguidance {"no_forcing": true}'
# JSON written as models write it (", " and ": "), with no other whitespace, so a reply cannot run on in blanks;
# tool arguments may have a blank or two around them (a model's newline before <|tool_call_end|>).
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def check_schema(schema: dict[str, Any], field: str) -> None:
    """400 naming `field` when the grammar library cannot constrain output to this JSON schema."""
    try:
        GrammarTokenizer.check_json_schema(schema)
    except GrammarError as e:
        raise ApiError(400, f"this JSON schema cannot be enforced: {e}", param=field, code="invalid_value") from None


def reply_grammar(service: Service, answer_schema: dict[str, Any] | None, tools: list[Tool], choice: ToolChoice,
                  parallel: bool, found: ToolCallMarkers | None, reasoning: tuple[int, int] | None,
                  in_reasoning: bool, forced: list[int]) -> Grammar | None:
    """The reply's grammar, or None when the request constrains nothing. answer_schema: the JSON schema of the
    answer (already checked); reasoning: the (<think>, </think>) ids when the chat template reasons;
    in_reasoning: the prompt left <think> open; forced: the tokens the prompt wrote at the reply's start."""
    if answer_schema is None and not any(t.strict for t in tools):
        return None
    lark = _lark(answer_schema, tools, choice, parallel, found, reasoning, in_reasoning)
    try:
        return service.grammars().compile(lark, forced)
    except GrammarError as e:
        raise ApiError(400, f"the reply's grammar cannot be built: {e}", code="invalid_value") from None


def _lark(answer_schema: dict[str, Any] | None, tools: list[Tool], choice: ToolChoice, parallel: bool,
          found: ToolCallMarkers | None, reasoning: tuple[int, int] | None, in_reasoning: bool) -> str:
    # Reasoning is free text, whether the prompt opened it or the model does.
    start = "start: reply"
    if reasoning is not None:
        think_open, think_close = reasoning
        start = f"start: TEXT <[{think_close}]> reply" if in_reasoning else \
            f"start: (<[{think_open}]> TEXT <[{think_close}]>)? reply"
    lines = [EVERY_SPLIT, start, "TEXT: /(.|\\n)*/"]
    answer = "TEXT" if answer_schema is None else _json(answer_schema)
    if not tools or choice.mode == "none":
        lines.append(f"reply: {answer}")
        return "\n".join(lines)
    lines.append(f"reply: {answer} | TEXT section" if choice.mode == "auto" else "reply: section")
    calls = "call+" if parallel and choice.mode != "function" else "call"  # a named function: one call
    lines.append(f"section: <[{found.section_begin}]> {calls} <[{found.section_end}]>")
    lines.append("BLANK: /[ \\t\\r\\n]{1,2}/")
    callable_tools = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(callable_tools))))
    for i, tool in enumerate(callable_tools):
        arguments = _json(tool.parameters if tool.strict else ANY_OBJECT)
        lines.append(f"ID_{i}: /{_call_id(tool.name)}/")
        lines.append(f"call_{i}: <[{found.call_begin}]> ID_{i} <[{found.argument_begin}]> BLANK? arguments_{i} BLANK? "
                     f"<[{found.call_end}]>")
        lines.append(f"arguments_{i}: {arguments}")
    return "\n".join(lines)


def _call_id(name: str) -> str:
    """A regex of the ids the reply's parser reads as a call of `name` (tool_calls.CALL_ID), but for blanks
    around them and indices past six digits, which no model writes and a random one would run on in."""
    return rf"(functions\.)?{re.escape(name)}:[0-9]{{1,6}}"


def _json(schema: dict[str, Any]) -> str:
    """A Lark rule body: JSON of this schema."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})
