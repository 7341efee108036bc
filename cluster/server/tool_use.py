"""Tools a request declares, whatever its protocol: checked, handed to the chat template as Kimi's templates
expect them (OpenAI's shape), and steered by the tool choice:

- auto: the model decides;
- none: the model cannot open a tool-call section (its first marker is never sampled);
- required: the reply starts with an open call (<|tool_calls_section_begin|><|tool_call_begin|>functions.),
  so the model writes a call, naming the function itself;
- a named function: the reply starts with that call's id and <|tool_call_argument_begin|>, so the model
  writes its arguments; the reply ends after that one call.

The forced start is written into the prompt, not hoped for; the reply's text stream reads it as if the
model had written it (TextStream.force), so the call comes back whole.

Call ids are Kimi's, functions.NAME:N with N counting the conversation's calls from 0: the history is
numbered so before it is rendered (clients' ids may be anything, and repeat), and a reply's calls are
numbered on from there, so a client never sees one id twice in a conversation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from cluster.server.errors import ApiError
from cluster.server.service import Service
from runtime.tool_calls import ToolCallMarkers, ToolCallParser

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's and Anthropic's rule


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of the arguments object
    strict: bool = False  # arguments held to `parameters` by constrained decoding (structured_output.py)


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None  # the function, when mode is "function"


def check_tools(tools: list[Tool], choice: ToolChoice, field: str, choice_field: str) -> None:
    """Names valid and unique, parameters a JSON schema of an object, the choice among them; 400 naming the
    field otherwise (`field`: where the protocol keeps its tools, e.g. "tools")."""
    seen = set()
    for i, tool in enumerate(tools):
        if not FUNCTION_NAME.fullmatch(tool.name):
            raise ApiError(400, f"tool name {tool.name!r} must be 1-64 letters, digits, '_' or '-'",
                           param=f"{field}[{i}].name", code="invalid_value")
        if tool.name in seen:
            raise ApiError(400, f"two tools are named {tool.name!r}; names must be unique", param=f"{field}[{i}].name",
                           code="invalid_value")
        seen.add(tool.name)
        if tool.parameters.get("type", "object") != "object":
            raise ApiError(400, f"the parameters of tool {tool.name!r} must be a JSON schema of an object "
                                f"(\"type\": \"object\"), not of {tool.parameters.get('type')!r}",
                           param=f"{field}[{i}].parameters", code="invalid_value")
    if choice.mode in ("required", "function") and not tools:
        raise ApiError(400, f"{choice_field} asks for a tool call, but the request declares no tools",
                       param=choice_field, code="invalid_value")
    if choice.mode == "function" and choice.name not in seen:
        raise ApiError(400, f"{choice_field} names {choice.name!r}, which is not among the declared tools "
                            f"({', '.join(sorted(seen))})", param=choice_field, code="invalid_value")


def template_tools(tools: list[Tool]) -> list[dict[str, Any]] | None:
    """The tools as the chat template gets them: OpenAI's shape, as Kimi's templates render them."""
    if not tools:
        return None
    return [{"type": "function", "function": {"name": t.name, **({"description": t.description} if t.description
                                                                    else {}), "parameters": t.parameters}}
            for t in tools]


def markers(service: Service, tools: list[Tool]) -> ToolCallMarkers | None:
    """The model's tool-call markers; a request with tools on a model without them is refused."""
    found = ToolCallMarkers.of(service.tokenizer)
    if tools and found is None:
        raise ApiError(400, "this model's vocabulary has no tool-call markers (<|tool_calls_section_begin|> ...), "
                            "so it cannot call tools; leave 'tools' out", param="tools", code="unsupported_parameter")
    return found


def forced_start(service: Service, tools: list[Tool], found: ToolCallMarkers | None, choice: ToolChoice,
                 think_close: int | None = None) -> list[int]:
    """The tokens the reply must start with: an open call for "required", a named call's id for a function;
    after `think_close` (</think>) when the prompt left reasoning open, as a forced call comes before any."""
    encode = service.tokenizer.encode
    if not tools or choice.mode not in ("required", "function"):
        return []
    start = [] if think_close is None else [think_close]
    if choice.mode == "required":
        return start + [found.section_begin, found.call_begin, *encode("functions.", parse_special=False,
                                                                       add_bos=False)]
    return start + [found.section_begin, found.call_begin,
                    *encode(f"functions.{choice.name}:0", parse_special=False, add_bos=False), found.argument_begin]


def banned_tokens(found: ToolCallMarkers | None, choice: ToolChoice) -> frozenset[int]:
    return frozenset({found.section_begin}) if found is not None and choice.mode == "none" else frozenset()


def parser(service: Service, tools: list[Tool], found: ToolCallMarkers | None, choice: ToolChoice,
           parallel: bool, earlier_calls: int) -> ToolCallParser | None:
    """What reads the reply's tool calls, unless there are none to read; their ids count on from earlier_calls.
    A named function is one call, whatever the model would write after it."""
    if not tools or found is None or choice.mode == "none":
        return None
    return ToolCallParser(service.tokenizer, found, frozenset(t.name for t in tools),
                          single=not parallel or choice.mode == "function", first_index=earlier_calls)


def number_calls(conversation: list[dict]) -> tuple[list[dict], int]:
    """The chat template's messages with every tool call's id made functions.NAME:N, N counting calls from 0,
    and each tool result pointing at its call's new id; and how many calls there were. A result answers the
    latest call with its id (clients that reuse ids reuse them turn after turn)."""
    numbered, new_ids, count = [], {}, 0
    for message in conversation:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                new_ids[call["id"]] = f"functions.{call['function']['name']}:{count}"
                calls.append({**call, "id": new_ids[call["id"]]})
                count += 1
            message = {**message, "tool_calls": calls}
        elif message.get("role") == "tool" and message.get("tool_call_id") in new_ids:
            message = {**message, "tool_call_id": new_ids[message["tool_call_id"]]}
        numbered.append(message)
    return numbered, count
