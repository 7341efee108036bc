"""OpenAI's Responses API over the shared service (service.py): POST /v1/responses, whole or streamed as its typed
server-sent events, with OpenAI's error shape. Codex CLI and OpenAI's Agents SDK speak it.

Input items become the chat template's messages: `instructions` and system or developer messages as system
turns, user and assistant messages, function_call items as the assistant's tool calls, function_call_output
items as tool results, reasoning items as the assistant's reasoning. The reply comes back as output items:
reasoning (Kimi's thinking, as its summary), a message, function calls (call ids as tool_use.py numbers them).
Tools of types the server cannot run (web_search, MCP, ...) are left out with a note on the console. With
`store` (the default), a response is kept in memory (the last STORED_RESPONSES, for STORE_SECONDS) so that a
later request can go on from it by `previous_response_id`.
"""
from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.server import structured_output
from cluster.server.chat_prompt import chat_prompt
from cluster.server.errors import ApiError, openai_error_body
from cluster.server.request_checks import check_model, images_not_supported, parse_body, sampling_params
from cluster.server.service import Event, Generation, Service, engine_request, text_stream
from cluster.server.tool_use import Tool, ToolChoice
from runtime.text_output import reasoning_markers

PATHS = ("/v1/responses",)
STORED_RESPONSES, STORE_SECONDS = 256, 3600
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
error_body = openai_error_body


# ---- request bodies ----

class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesBody(_Strict):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None

    def items(self) -> list[dict[str, Any]]:
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def declared_tools(self) -> tuple[list[Tool], list[str]]:
        """The function tools, and the kinds of the others (which this server cannot run)."""
        tools, left_out = [], []
        for i, spec in enumerate(self.tools or []):
            if spec.get("type") != "function":
                left_out.append(str(spec.get("type")))
                continue
            if not isinstance(spec.get("name"), str):
                raise ApiError(400, "a function tool needs a 'name'", param=f"tools[{i}].name", code="invalid_value")
            parameters = spec.get("parameters") or {"type": "object", "properties": {}}
            if spec.get("strict"):
                structured_output.check_schema(parameters, f"tools[{i}].parameters")
            tools.append(Tool(spec["name"], spec.get("description"), parameters, bool(spec.get("strict"))))
        return tools, left_out

    def choice(self, tools: list[Tool]) -> ToolChoice:
        if self.tool_choice is None:
            return ToolChoice("auto" if tools else "none")
        if isinstance(self.tool_choice, str):
            return ToolChoice(self.tool_choice)
        if self.tool_choice.get("type") == "function" and isinstance(self.tool_choice.get("name"), str):
            return ToolChoice("function", self.tool_choice["name"])
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                       param="tool_choice", code="invalid_value")

    def answer_schema(self) -> dict[str, Any] | None:
        answer = self.text.format if self.text is not None else None
        if answer is None or answer.type == "text":
            return None
        if answer.type == "json_object":
            return structured_output.ANY_OBJECT
        if answer.schema_ is None:
            raise ApiError(400, "a text.format of type 'json_schema' needs its 'schema'", param="text.format.schema",
                           code="invalid_value")
        structured_output.check_schema(answer.schema_, "text.format.schema")
        return answer.schema_


# ---- the conversation ----

def template_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict]:
    """Input items as the chat template's messages (OpenAI's chat shape); 400s name the item."""
    conversation = [{"role": "system", "content": instructions}] if instructions else []
    call_ids, reasoning = set(), []
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise ApiError(400, f"unknown role {item.get('role')!r}; use user, assistant, system or developer",
                               param=f"{where}.role", code="invalid_value")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                _assistant(conversation, reasoning)["content"] = text
            else:
                conversation.append({"role": role, "content": text})
        elif kind == "function_call":
            if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
                raise ApiError(400, "a function_call item needs 'call_id', 'name' and 'arguments' (a JSON string)",
                               param=where, code="invalid_value")
            call_ids.add(item["call_id"])
            _assistant(conversation, reasoning).setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            if item.get("call_id") not in call_ids:
                raise ApiError(400, f"this function_call_output answers {item.get('call_id')!r}, which no earlier "
                                    "function_call item has as its call_id", param=f"{where}.call_id",
                               code="invalid_value")
            conversation.append({"role": "tool", "tool_call_id": item["call_id"],
                                 "content": _text(item.get("output", ""), f"{where}.output")})
        elif kind == "reasoning":
            reasoning += [_text(item.get(key) or [], f"{where}.{key}") for key in ("summary", "content")]
        else:
            raise ApiError(400, f"an input item of type {kind!r} is not supported here; this server takes message, "
                                "function_call, function_call_output and reasoning items", param=f"{where}.type",
                           code="invalid_value")
    return conversation


def _assistant(conversation: list[dict], reasoning: list[str]) -> dict:
    """The assistant turn that items add to: the last message if it is the assistant's, else a new one (which
    takes the reasoning read since the last turn)."""
    if not conversation or conversation[-1]["role"] != "assistant":
        conversation.append({"role": "assistant", "content": None})
    turn = conversation[-1]
    if any(reasoning):
        turn["reasoning_content"] = "".join(reasoning)
    reasoning.clear()
    return turn


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text parts; an image or a file among them is a 400, not dropped."""
    if isinstance(content, str):
        return content
    if not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
        raise ApiError(400, "expected a string or a list of text parts (input_text, output_text)", param=where,
                       code="invalid_value")
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "input_image":
            raise images_not_supported(f"{where}[{j}].type")
        if kind not in TEXT_PARTS:
            raise ApiError(400, f"a content part of type {kind!r} is not supported; this server reads text parts "
                                "(input_text, output_text)", param=f"{where}[{j}].type", code="invalid_value")
    return "".join(str(p.get("text", "")) for p in content)


class ResponseStore:
    """Responses kept for previous_response_id: their whole conversation as input items, newest last."""

    def __init__(self):
        self._items: OrderedDict[str, tuple[float, list[dict]]] = OrderedDict()

    def keep(self, response_id: str, items: list[dict]) -> None:
        self._items[response_id] = (time.monotonic(), items)
        while len(self._items) > STORED_RESPONSES:
            self._items.popitem(last=False)

    def items(self, response_id: str) -> list[dict]:
        kept = self._items.get(response_id)
        if kept is None or time.monotonic() - kept[0] > STORE_SECONDS:
            raise ApiError(404, f"no stored response {response_id!r}: responses are kept in memory for "
                                f"{STORE_SECONDS // 60} minutes (and not across restarts); send the whole "
                                "conversation as input instead", param="previous_response_id", code="not_found")
        return kept[1]


# ---- routes ----

def routes(service: Service) -> APIRouter:
    router = APIRouter()
    tokenizer = service.tokenizer
    markers = reasoning_markers(tokenizer, tokenizer.chat_template)
    store = ResponseStore()

    @router.post("/v1/responses")
    async def responses(http: HttpRequest):
        body = await parse_body(http, ResponsesBody)
        check_model(service, body.model)
        tools, left_out = body.declared_tools()
        for kind in left_out:
            service.note(f"left out a tool of type {kind!r}: this server runs function tools only")
        items = (store.items(body.previous_response_id) if body.previous_response_id else []) + body.items()
        prompt = await chat_prompt(service, template_messages(items, body.instructions), tools, body.choice(tools),
                                   markers, "input")
        grammar = await prompt.grammar(service, body.answer_schema(), body.parallel_tool_calls)
        max_tokens = body.max_output_tokens or max(service.context_size - len(prompt.tokens), 1)
        request = engine_request(service, prompt.tokens, max_tokens,
                                 sampling_params(temperature=body.temperature, top_p=body.top_p),
                                 banned_tokens=prompt.banned_tokens(), grammar=grammar)
        text = text_stream(service, [], markers, prompt.in_reasoning,
                           prompt.tool_parser(service, body.parallel_tool_calls), prompt.forced)
        generation = Generation(service, http, request, text, prompt_param="input")
        reply = Reply(service, generation, body, store if body.store else None, items)
        if body.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await reply.whole()

    return router


# ---- the reply ----

class Reply:
    """One response's output items, whole or as the Responses API's events."""

    def __init__(self, service: Service, generation: Generation, body: ResponsesBody, store: ResponseStore | None,
                 items: list[dict]):
        self.service, self.generation, self.body, self.store, self.items = service, generation, body, store, items
        self.id = f"resp_{secrets.token_hex(16)}"
        self.created = int(time.time())
        self.output: list[dict] = []  # items, as complete as the stream has made them
        self.reasoning_tokens = 0
        self.sequence = 0

    def _response(self, status: str, finish_reason: str | None = None) -> dict:
        body = self.body
        response = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.service.model_name, "output": self.output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning, "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": body.text.format.model_dump(by_alias=True) if body.text and body.text.format
                     else {"type": "text"}},
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "metadata": body.metadata or {},
        }
        if status != "in_progress":
            generation = self.generation
            response["usage"] = {
                "input_tokens": generation.prompt_tokens,
                "input_tokens_details": {"cached_tokens": generation.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": generation.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": generation.prompt_tokens + generation.completion_tokens}
        return response

    def _finished(self, finish_reason: str | None) -> dict:
        status = "incomplete" if finish_reason == "length" else "completed"
        if self.store is not None:
            self.store.keep(self.id, self.items + [_as_input(item) for item in self.output])
        return self._response(status, finish_reason)

    async def whole(self) -> dict:
        last = None
        async for event in self.generation.events():
            last = event
            self.reasoning_tokens += bool(event.delta.reasoning)
            for kind, piece in _pieces(event):
                item = self._open(kind, piece)
                _append(item, kind, piece)
        for item in self.output:
            item["status"] = "completed"
        return self._finished(last.finish_reason)

    async def events(self) -> AsyncIterator[bytes]:
        yield self._event("response.created", response=self._response("in_progress"))
        yield self._event("response.in_progress", response=self._response("in_progress"))
        try:
            async for event in self.generation.events(heartbeat=True):
                if event is None:  # no token yet (a long prompt): an SSE comment keeps the connection alive
                    yield b": keep-alive\n\n"
                    continue
                self.reasoning_tokens += bool(event.delta.reasoning)
                for kind, piece in _pieces(event):
                    if self._starts_item(kind):
                        for closing in self._close_last():
                            yield closing
                        for opening in self._opening(kind, piece):
                            yield opening
                    for delta in self._deltas(kind, piece):
                        yield delta
                if event.finish_reason is not None:
                    for closing in self._close_last():
                        yield closing
                    response = self._finished(event.finish_reason)
                    name = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
                    yield self._event(name, response=response)
        except ApiError as e:
            yield self._event("error", code=e.code, message=e.message, param=e.param)

    def _starts_item(self, kind: str) -> bool:
        """Whether a piece of this kind opens an output item (a function call always does), or goes on the last."""
        return not self.output or self.output[-1]["type"] != kind or kind == "function_call"

    def _open(self, kind: str, piece) -> dict:
        """The output item a piece goes into."""
        if self._starts_item(kind):
            self.output.append(_new_item(kind, piece))
        return self.output[-1]

    def _opening(self, kind: str, piece) -> list[bytes]:
        item = self._open(kind, piece)
        index = len(self.output) - 1
        events = [self._event("response.output_item.added", output_index=index, item=item)]
        if kind == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        elif kind == "reasoning":
            events.append(self._event("response.reasoning_summary_part.added", item_id=item["id"], output_index=index,
                                      summary_index=0, part={"type": "summary_text", "text": ""}))
        return events

    def _deltas(self, kind: str, piece) -> list[bytes]:
        item, index = self.output[-1], len(self.output) - 1
        _append(item, kind, piece)
        if kind == "message":
            return [self._event("response.output_text.delta", item_id=item["id"], output_index=index,
                                content_index=0, delta=piece, logprobs=[])]
        if kind == "reasoning":
            return [self._event("response.reasoning_summary_text.delta", item_id=item["id"], output_index=index,
                                summary_index=0, delta=piece)]
        return [self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=piece.arguments)]

    def _close_last(self) -> list[bytes]:
        if not self.output or self.output[-1]["status"] == "completed":
            return []
        item, index = self.output[-1], len(self.output) - 1
        item["status"] = "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)]
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            events += [self._event("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                                   summary_index=0, text=part["text"]),
                       self._event("response.reasoning_summary_part.done", item_id=item["id"], output_index=index,
                                   summary_index=0, part=part)]
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"], name=item["name"]))
        return events + [self._event("response.output_item.done", output_index=index, item=item)]

    def _event(self, event_type: str, **fields) -> bytes:
        payload = {"type": event_type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {event_type}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _pieces(event: Event) -> list[tuple[str, Any]]:
    """(output item kind, piece) of an event, in order: reasoning, message text, then each tool call."""
    pieces = []
    if event.delta.reasoning:
        pieces.append(("reasoning", event.delta.reasoning))
    if event.delta.content:
        pieces.append(("message", event.delta.content))
    return pieces + [("function_call", call) for call in event.delta.tool_calls]


def _new_item(kind: str, piece) -> dict:
    if kind == "message":
        return {"type": "message", "id": f"msg_{secrets.token_hex(16)}", "status": "in_progress",
                "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]}
    if kind == "reasoning":
        return {"type": "reasoning", "id": f"rs_{secrets.token_hex(16)}", "status": "in_progress",
                "summary": [{"type": "summary_text", "text": ""}]}
    return {"type": "function_call", "id": f"fc_{secrets.token_hex(16)}", "status": "in_progress",
            "call_id": piece.id, "name": piece.name, "arguments": ""}


def _append(item: dict, kind: str, piece) -> None:
    if kind == "message":
        item["content"][0]["text"] += piece
    elif kind == "reasoning":
        item["summary"][0]["text"] += piece
    else:
        item["arguments"] += piece.arguments


def _as_input(item: dict) -> dict:
    """An output item as a later request's input item."""
    if item["type"] == "message":
        return {"type": "message", "role": "assistant", "content": item["content"][0]["text"]}
    if item["type"] == "reasoning":
        return {"type": "reasoning", "summary": item["summary"]}
    return {"type": "function_call", "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
