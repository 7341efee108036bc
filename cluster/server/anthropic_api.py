"""Anthropic's Messages API over the shared service (service.py): POST /v1/messages (streamed as Anthropic's
server-sent events or not) and POST /v1/messages/count_tokens, with Anthropic's error shape
{"type": "error", "error": {"type", "message"}}.

A conversation is turned into the chat template's messages (OpenAI's shape, which Kimi's templates read):
text blocks into content, tool_use blocks into tool_calls (input as JSON arguments), tool_result blocks into
tool messages; system messages where they stand. The reply comes back as blocks: thinking (when `thinking` is
enabled or adaptive), text, tool_use.

What coding agents send besides is taken without a 400: metadata, context_management, output_config.effort,
cache_control, beta headers (unknown fields are ignored); Anthropic's server tools (web search, ...) are left
out with a note on the console, as they run on Anthropic's side.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.server import structured_output
from cluster.server.chat_prompt import ChatPrompt, chat_prompt
from cluster.server.errors import ApiError
from cluster.server.request_checks import check_model, images_not_supported, parse_body, sampling_params
from cluster.server.service import Event, Generation, Service, engine_request, text_stream
from cluster.server.tool_use import Tool, ToolChoice
from runtime.text_output import reasoning_markers

PATHS = ("/v1/messages",)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def error_body(error: ApiError) -> dict:
    kind = ERROR_TYPES.get(error.status, "api_error")
    field = f" ({error.param})" if error.param and error.param not in error.message else ""
    return {"type": "error", "error": {"type": kind, "message": error.message + field}}


# ---- request bodies ----

class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ToolSpec(_Strict):
    type: str = "custom"  # others are Anthropic's server tools (web_search_..., bash_...), which run there
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # required of custom tools
    strict: bool | None = None  # input held to input_schema by constrained decoding


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None


class ToolChoiceSpec(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Message(_Strict):
    role: Literal["user", "assistant", "system"]  # system turns mid-conversation: Claude Code sends them
    content: str | list[dict[str, Any]]


class Thinking(_Strict):
    """Whether the reply shows the model's reasoning as thinking blocks (enabled, or adaptive: Kimi decides how
    long to think either way; a budget is taken but not enforced)."""
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)

    @property
    def shown(self) -> bool:
        return self.type != "disabled"


class CountBody(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoiceSpec | None = None
    thinking: Thinking | None = None

    def server_tools(self) -> list[ToolSpec]:
        """Tools of Anthropic's own (web search, code execution, ...): this server cannot run them."""
        return [t for t in self.tools or [] if t.type != "custom"]

    def declared_tools(self) -> list[Tool]:
        tools = []
        for i, tool in enumerate(self.tools or []):
            if tool.type != "custom":
                continue
            if tool.input_schema is None:
                raise ApiError(400, f"tool {tool.name!r} needs an 'input_schema' (a JSON schema of its input)",
                               param=f"tools[{i}].input_schema")
            if tool.strict:
                structured_output.check_schema(tool.input_schema, f"tools[{i}].input_schema")
            tools.append(Tool(tool.name, tool.description, tool.input_schema, bool(tool.strict)))
        return tools

    def choice(self) -> ToolChoice:
        """Anthropic's default is auto; "any" is OpenAI's "required"."""
        if self.tool_choice is None:
            return ToolChoice("auto" if self.tools else "none")
        mode = {"any": "required", "tool": "function"}.get(self.tool_choice.type, self.tool_choice.type)
        if mode == "function" and not self.tool_choice.name:
            raise ApiError(400, "tool_choice of type 'tool' needs the tool's 'name'", param="tool_choice.name")
        return ToolChoice(mode, self.tool_choice.name)


class MessagesBody(CountBody):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stream: bool = False
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for output_config.format

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the text answer must follow (checked), or None."""
        if self.output_config is not None and self.output_config.format is not None:
            schema, field = self.output_config.format.schema_, "output_config.format.schema"
        elif self.output_format is not None:
            schema, field = self.output_format.schema_, "output_format.schema"
        else:
            return None
        structured_output.check_schema(schema, field)
        return schema


# ---- routes ----

def routes(service: Service) -> APIRouter:
    router = APIRouter()
    tokenizer = service.tokenizer
    markers = reasoning_markers(tokenizer, tokenizer.chat_template)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(http: HttpRequest):
        body = await _parse(http, CountBody, service)
        prompt = await _prompt(service, body, markers)
        return {"input_tokens": len(prompt.tokens)}

    @router.post("/v1/messages")
    async def messages(http: HttpRequest):
        body = await _parse(http, MessagesBody, service)
        for tool in body.server_tools():
            service.note(f"left out tool {tool.name!r} of type {tool.type!r}: it runs on Anthropic's servers, not "
                         "here")
        prompt = await _prompt(service, body, markers)
        params = sampling_params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
        parallel = not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
        grammar = await prompt.grammar(service, body.answer_schema(), parallel)
        request = engine_request(service, prompt.tokens, body.max_tokens, params,
                                 banned_tokens=prompt.banned_tokens(), grammar=grammar)
        text = text_stream(service, body.stop_sequences or [], markers, prompt.in_reasoning,
                           prompt.tool_parser(service, parallel), prompt.forced)
        generation = Generation(service, http, request, text, prompt_param="messages")
        reply = Reply(service, generation, thinking=bool(body.thinking and body.thinking.shown))
        if body.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await reply.whole()

    return router


async def _parse(http: HttpRequest, body_type: type[CountBody], service: Service) -> CountBody:
    body = await parse_body(http, body_type)
    check_model(service, body.model)
    return body


async def _prompt(service: Service, body: CountBody, markers) -> ChatPrompt:
    return await chat_prompt(service, template_messages(body), body.declared_tools(), body.choice(), markers)


def template_messages(body: CountBody) -> list[dict]:
    """Anthropic's system and messages as the chat template's messages (OpenAI's shape)."""
    conversation = []
    if body.system:
        conversation.append({"role": "system", "content": _text(body.system, "system")})
    tool_use_ids = set()
    for i, message in enumerate(body.messages):
        blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
        texts, calls, reasoning = [], [], []
        for j, block in enumerate(blocks):
            where = f"messages[{i}].content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "thinking" and message.role == "assistant":
                reasoning.append(str(block.get("thinking", "")))
            elif kind == "redacted_thinking" and message.role == "assistant":
                continue
            elif kind == "tool_use" and message.role == "assistant":
                calls.append(_tool_call(block, where))
                tool_use_ids.add(block["id"])
            elif kind == "tool_result" and message.role == "user":
                if block.get("tool_use_id") not in tool_use_ids:
                    raise ApiError(400, f"this tool_result answers {block.get('tool_use_id')!r}, which no earlier "
                                        "assistant tool_use block has as its id", param=f"{where}.tool_use_id")
                conversation.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                     "content": _text(block.get("content", ""), f"{where}.content")})
            elif kind == "image":
                raise images_not_supported(f"{where}.type")
            else:
                raise ApiError(400, f"a {message.role} message cannot hold a {kind!r} block here; this server takes "
                                    "text, tool_use (assistant), tool_result (user) and thinking (assistant) blocks",
                               param=f"{where}.type")
        if message.role == "assistant":
            entry = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                entry["tool_calls"] = calls
            if reasoning:
                entry["reasoning_content"] = "".join(reasoning)
            conversation.append(entry)
        elif texts:  # a user turn, or a system turn where it stands (Kimi's templates render both anywhere)
            conversation.append({"role": message.role, "content": "".join(texts)})
    return conversation


def _tool_call(block: dict, where: str) -> dict:
    if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
            and isinstance(block.get("input"), dict)):
        raise ApiError(400, "a tool_use block needs 'id', 'name' and 'input' (an object)", param=where)
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}}


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text blocks (an image among them, in a tool result say, is a 400)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "image" for b in content):
        raise images_not_supported(where)
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise ApiError(400, "expected a string or a list of text blocks", param=where)


# ---- the reply ----

class Reply:
    """One message's blocks, whole or as Anthropic's events."""

    def __init__(self, service: Service, generation: Generation, thinking: bool):
        self.service, self.generation, self.thinking = service, generation, thinking
        self.id = f"msg_{secrets.token_hex(12)}"

    def _message(self, content: list, stop_reason: str | None, stop_sequence: str | None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.service.model_name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": self._usage()}

    def _usage(self) -> dict:
        """Anthropic's split: input_tokens are the prompt tokens computed, cache reads those reused."""
        generation = self.generation
        return {"input_tokens": generation.prompt_tokens - generation.cached_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": generation.cached_tokens,
                "output_tokens": generation.completion_tokens}

    def _stop(self, event: Event) -> tuple[str, str | None]:
        text = self.generation.text
        if text.stop_string is not None:
            return "stop_sequence", text.stop_string
        return STOP_REASONS.get(event.finish_reason, "end_turn"), None

    def _blocks(self, event: Event) -> list[tuple[str, Any]]:
        """(kind, piece) of an event, in order: thinking, text, then each tool call."""
        pieces = []
        if event.delta.reasoning and self.thinking:
            pieces.append(("thinking", event.delta.reasoning))
        if event.delta.content:
            pieces.append(("text", event.delta.content))
        pieces += [("tool_use", call) for call in event.delta.tool_calls]
        return pieces

    async def whole(self) -> dict:
        content: list[dict] = []
        last = None
        async for event in self.generation.events():
            last = event
            for kind, piece in self._blocks(event):
                if kind == "tool_use":
                    content.append({"type": "tool_use", "id": piece.id, "name": piece.name,
                                    "input": json.loads(piece.arguments)})
                elif content and content[-1]["type"] == kind:
                    content[-1][kind] += piece
                else:
                    content.append({"type": kind, kind: piece, **({"signature": ""} if kind == "thinking" else {})})
        return self._message(content, *self._stop(last))

    async def events(self) -> AsyncIterator[bytes]:
        yield _event("message_start", {"type": "message_start", "message": self._message([], None, None)})
        index, open_kind = -1, None
        try:
            async for event in self.generation.events(heartbeat=True):
                if event is None:  # no token yet (a long prompt): keep the connection alive
                    yield _event("ping", {"type": "ping"})
                    continue
                for kind, piece in self._blocks(event):
                    if kind != open_kind or kind == "tool_use":
                        if open_kind is not None:
                            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
                        index, open_kind = index + 1, kind
                        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                             "content_block": _empty_block(kind, piece)})
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                         "delta": _delta(kind, piece)})
                if event.finish_reason is not None:
                    if open_kind is not None:
                        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
                    stop_reason, stop_sequence = self._stop(event)
                    delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
                    yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": self._usage()})
            yield _event("message_stop", {"type": "message_stop"})
        except ApiError as e:
            yield _event("error", error_body(e))


def _empty_block(kind: str, piece) -> dict:
    if kind == "tool_use":
        return {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def _delta(kind: str, piece) -> dict:
    if kind == "tool_use":
        return {"type": "input_json_delta", "partial_json": piece.arguments}
    if kind == "thinking":
        return {"type": "thinking_delta", "thinking": piece}
    return {"type": "text_delta", "text": piece}


def _event(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
