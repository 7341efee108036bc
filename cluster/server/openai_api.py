"""OpenAI's API over the shared service (service.py): /v1/models, /v1/completions and /v1/chat/completions,
streamed as server-sent events or not, with OpenAI's error shape {"error": {"message", "type", "param",
"code"}}.

Unknown request fields are ignored, as llama-server and vLLM do, so clients built for them work unchanged;
OpenAI fields that would change the answer but are not implemented (echo, logit_bias, ...) are refused.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator, Callable, Literal, Union

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.server import structured_output
from cluster.server.chat_prompt import chat_prompt
from cluster.server.errors import ApiError, openai_error_body
from cluster.server.request_checks import check_model, images_not_supported, parse_body, sampling_params
from cluster.server.service import Event, Generation, Service, engine_request, text_stream
from cluster.server.tool_use import Tool, ToolChoice
from runtime.sampling import SamplingParams
from runtime.text_output import reasoning_markers
from runtime.tokenizer import Tokenizer
from runtime.tool_calls import ToolCallDelta

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


error_body = openai_error_body


# ---- request bodies ----

# name -> whether a value leaves the answer as if the field were absent
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False or v is None,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "logit_bias": lambda v: not v,
    "functions": lambda v: not v,
}


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is enforced either way (constrained decoding)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Body(BaseModel):
    # strict: "5" is not a number, as in OpenAI's API; unknown fields are ignored.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's: generate past end-of-generation tokens, up to max_tokens (benchmarks)
    response_format: ResponseFormat | None = None

    def sampling(self) -> SamplingParams:
        return sampling_params(temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                               min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                               presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                               seed=self.seed)

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (checked), or None for free text."""
        answer = self.response_format
        if answer is None or answer.type == "text":
            return None
        if answer.type == "json_object":
            return structured_output.ANY_OBJECT
        if answer.json_schema is None:
            raise ApiError(400, "a response_format of type 'json_schema' needs 'json_schema': {'name': ..., "
                                "'schema': {...}}", param="response_format.json_schema", code="invalid_value")
        structured_output.check_schema(answer.json_schema.schema_, "response_format.json_schema.schema")
        return answer.json_schema.schema_

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unsupported(self) -> None:
        """Fields OpenAI defines that would change the answer but are not implemented here: refused rather than
        silently ignored (unknown fields are ignored)."""
        extra = self.model_extra or {}
        for name, is_default in UNSUPPORTED.items():
            if name in extra and not is_default(extra[name]):
                raise ApiError(400, f"'{name}' is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionBody(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> "ChatMessage":
        # As OpenAI: only an assistant message may leave its content null (it may carry tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content' (a string or a list of parts), not null")
        return self


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def declared_tools(self) -> list[Tool]:
        for i, tool in enumerate(self.tools or []):
            if tool.function.strict:
                structured_output.check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        return [Tool(t.function.name, t.function.description, t.function.parameters, bool(t.function.strict))
                for t in self.tools or []]

    def choice(self) -> ToolChoice:
        """OpenAI's default: "auto" with tools, "none" without."""
        if self.tool_choice is None:
            return ToolChoice("auto" if self.tools else "none")
        if isinstance(self.tool_choice, str):
            return ToolChoice(self.tool_choice)
        return ToolChoice("function", self.tool_choice.function.name)


# ---- routes ----

def routes(service: Service) -> APIRouter:
    router = APIRouter()
    tokenizer = service.tokenizer
    markers = reasoning_markers(tokenizer, tokenizer.chat_template)  # <think> ids, if the template reasons

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(service, model_id)
        return _model_card(service)

    @router.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await _parse(http, CompletionBody, service)
        prompt = await asyncio.to_thread(_completion_prompt, tokenizer, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        grammar = await asyncio.to_thread(structured_output.reply_grammar, service, body.answer_schema(), [],
                                          ToolChoice("none"), False, None, None, False, [])
        request = engine_request(service, prompt, max_tokens, body.sampling(), body.ignore_eos, body.logprobs,
                                 grammar=grammar)
        generation = Generation(service, http, request, text_stream(service, body.stop_strings()))
        return await _respond(body.stream, generation, CompletionChunks(service, generation, body, tokenizer))

    @router.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await _parse(http, ChatBody, service)
        _check_tool_history(body.messages)
        prompt = await chat_prompt(service, _template_messages(body.messages), body.declared_tools(), body.choice(),
                                   markers)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(service.context_size - len(prompt.tokens), 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        grammar = await prompt.grammar(service, body.answer_schema(), body.parallel_tool_calls)
        request = engine_request(service, prompt.tokens, max_tokens, body.sampling(), body.ignore_eos, top,
                                 prompt.banned_tokens(), grammar)
        text = text_stream(service, body.stop_strings(), markers, prompt.in_reasoning,
                           prompt.tool_parser(service, body.parallel_tool_calls), prompt.forced)
        generation = Generation(service, http, request, text, prompt_param="messages")
        return await _respond(body.stream, generation, ChatChunks(service, generation, body, tokenizer))

    return router


async def _parse(http: HttpRequest, body_type: type[_Body], service: Service) -> _Body:
    """The request body, validated: JSON, field types and ranges, no unsupported fields, the served model."""
    body = await parse_body(http, body_type)
    body.refuse_unsupported()
    check_model(service, body.model)
    return body


def _model_card(service: Service) -> dict:
    """OpenAI's model object, with the context (as context_length, and as vLLM names it, max_model_len) and the
    file's quantization and size (null where the server was not told)."""
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "kimi-cluster",
            "context_length": service.context_size, "max_model_len": service.context_size,
            "quantization": service.quantization, "file_size_bytes": service.file_bytes}


def _completion_prompt(tokenizer: Tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"got {len(prompt)} prompts; this server takes one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # As llama.cpp does for a raw prompt: special tokens parsed, BOS only if the file asks for it.
        return tokenizer.encode(prompt, parse_special=True)
    return list(prompt)


def _check_tool_history(messages: list[ChatMessage]) -> None:
    """Assistant tool calls well formed; every tool result answers an earlier call (by its id)."""
    call_ids = set()
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        if message.role == "assistant" and extra.get("tool_calls") is not None:
            calls = extra["tool_calls"]
            for j, call in enumerate(calls if isinstance(calls, list) else [None]):
                function = call.get("function") if isinstance(call, dict) else None
                if not (isinstance(function, dict) and isinstance(call.get("id"), str)
                        and isinstance(function.get("name"), str) and isinstance(function.get("arguments"), str)):
                    raise ApiError(400, "an assistant tool call needs 'id', 'type': 'function' and 'function' with "
                                        "'name' and 'arguments' (a JSON string)",
                                   param=f"messages[{i}].tool_calls[{j}]", code="invalid_value")
                call_ids.add(call["id"])
        if message.role == "tool" and extra.get("tool_call_id") not in call_ids:
            raise ApiError(400, f"this tool result answers {extra.get('tool_call_id')!r}, which no earlier assistant "
                                "message's tool_calls has as its id; send the call before its result",
                           param=f"messages[{i}].tool_call_id", code="invalid_value")


def _template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them: content parts joined into text. A part of another kind
    (an image, audio, a file) is a 400: dropped, it would leave the model answering without it."""
    plain = []
    for i, message in enumerate(messages):
        entry = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                kind, param = part.get("type"), f"messages[{i}].content[{j}].type"
                if kind == "image_url":
                    raise images_not_supported(param)
                if kind != "text":
                    raise ApiError(400, f"a content part of type {kind!r} is not supported; this server reads text "
                                        "parts ({'type': 'text', 'text': ...})", param=param, code="invalid_value")
            entry["content"] = "".join(part.get("text", "") for part in message.content)
        plain.append(entry)
    return plain


async def _respond(stream: bool, generation: Generation, chunks: "CompletionChunks | ChatChunks"):
    if stream:
        async def sse() -> AsyncIterator[bytes]:
            try:
                for first in chunks.opening():
                    yield _sse(first)
                async for event in generation.events(heartbeat=True):
                    if event is None:  # no token yet (a long prompt): an SSE comment keeps the connection alive
                        yield b": keep-alive\n\n"
                    elif (chunk := chunks.chunk(event)) is not None:
                        yield _sse(chunk)
                if chunks.body.include_usage:
                    yield _sse(chunks.usage_chunk())
            except ApiError as e:
                yield _error_event(e)
            yield _sse("[DONE]")
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    events = [event async for event in generation.events()]
    return chunks.whole(events)


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _error_event(error: ApiError) -> bytes:
    return _sse(error_body(error))


# ---- response shapes ----

class _Chunks:
    """The JSON bodies of one response: `chunk` per streamed event, or `whole` for the complete answer."""
    object_chunk = object_whole = ""  # OpenAI's "object" names, set by each subclass
    id_prefix = "cmpl"

    def __init__(self, service: Service, generation: Generation, body: _Body, tokenizer: Tokenizer):
        self.service, self.generation, self.body, self.tokenizer = service, generation, body, tokenizer
        self.id = f"{self.id_prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.service.model_name,
                "choices": choices}

    def opening(self) -> list[dict]:
        return []

    def usage_chunk(self) -> dict:
        return {**self._envelope(self.object_chunk, []), "usage": self.generation.usage()}

    def _piece(self, token: int) -> str:
        """A token's text; part of a UTF-8 character is written "bytes:\\xNN..." as OpenAI does, and a token
        that decodes to nothing (a filler) by its vocabulary entry, so that no two tokens look alike."""
        raw = self.tokenizer.token_bytes(token)
        if not raw:
            return self.tokenizer.token_text(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class CompletionChunks(_Chunks):
    object_chunk = object_whole = "text_completion"

    def _logprobs(self, events: list[Event], offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for event in events:
            output = event.output
            result["tokens"].append(self._piece(output.token))
            result["token_logprobs"].append(output.logprob)
            result["top_logprobs"].append({self._piece(t): lp for t, lp in output.top_logprobs})
            result["text_offset"].append(offset)
            offset += len(event.delta.content)
        return result

    def chunk(self, event: Event) -> dict:
        choice = {"index": 0, "text": event.delta.content, "logprobs": self._logprobs([event], 0),
                  "finish_reason": event.finish_reason}
        return self._envelope(self.object_chunk, [choice])

    def whole(self, events: list[Event]) -> dict:
        text = "".join(e.delta.content for e in events)
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(events, 0),
                  "finish_reason": events[-1].finish_reason}
        return {**self._envelope(self.object_whole, [choice]), "usage": self.generation.usage()}


class ChatChunks(_Chunks):
    object_chunk, object_whole, id_prefix = "chat.completion.chunk", "chat.completion", "chatcmpl"

    def _token_entry(self, token: int, logprob: float) -> dict:
        return {"token": self._piece(token), "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token))}

    def _logprobs(self, events: list[Event]) -> dict | None:
        if not self.body.logprobs:
            return None
        return {"content": [{**self._token_entry(e.output.token, e.output.logprob),
                             "top_logprobs": [self._token_entry(t, lp) for t, lp in e.output.top_logprobs]}
                            for e in events]}

    def opening(self) -> list[dict]:
        return [self._envelope(self.object_chunk, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}])]

    def chunk(self, event: Event) -> dict | None:
        """None for a token that gives nothing to send (inside a tool call, or text held back for a stop
        string), unless its logprobs were asked for."""
        delta = {}
        if event.delta.reasoning:
            delta["reasoning_content"] = event.delta.reasoning
        if event.delta.content:
            delta["content"] = event.delta.content
        if event.delta.tool_calls:
            delta["tool_calls"] = _streamed_calls(event.delta.tool_calls)
        if not delta and event.finish_reason is None and not self.body.logprobs:
            return None
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs([event]), "finish_reason": event.finish_reason}
        return self._envelope(self.object_chunk, [choice])

    def whole(self, events: list[Event]) -> dict:
        text = self.generation.text
        calls = text.tools.calls if text.called_tools else []
        content = "".join(e.delta.content for e in events)
        message = {"role": "assistant", "content": None if calls and not content else content}
        reasoning = "".join(e.delta.reasoning for e in events)
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(events),
                  "finish_reason": events[-1].finish_reason}
        return {**self._envelope(self.object_whole, [choice]), "usage": self.generation.usage()}


def _streamed_calls(deltas: list[ToolCallDelta]) -> list[dict]:
    """OpenAI's tool_calls of a chunk: one entry per call, its id, type and name the first time."""
    entries: dict[int, dict] = {}
    for d in deltas:
        entry = entries.setdefault(d.index, {"index": d.index, "function": {"arguments": ""}})
        if d.id is not None:
            entry.update(id=d.id, type="function")
            entry["function"]["name"] = d.name
        entry["function"]["arguments"] += d.arguments
    return list(entries.values())
