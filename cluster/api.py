"""OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /health and /metrics.

Requests run on the Engine's background loop; each one's tokens come back to the event loop through an
asyncio queue. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Unknown
request fields are ignored, as llama-server and vLLM do, so clients built for them work unchanged; OpenAI
fields that would change the answer but are not implemented (echo, logit_bias, tools, ...) are refused.
"""
from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Union

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from cluster.metrics import ServerMetrics
from runtime.engine import ContextLengthExceeded, Engine, EngineFull, Request, SequenceFailed, TokenOutput
from runtime.sampling import SamplingParamError, SamplingParams
from runtime.text_output import THINK_OPEN, TextDelta, TextStream, reasoning_markers
from runtime.tokenizer import Tokenizer

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


# ---- request bodies ----

# name -> whether a value leaves the answer as if the field were absent
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False or v is None,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


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

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=self.seed)

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


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- the service behind the routes ----

@dataclass
class Service:
    """What the API serves. `engine` is None until the model has loaded."""
    model_name: str
    tokenizer: Tokenizer
    context_size: int
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    # {"workers": node -> "ok" or what is wrong, "down": node -> why, since when, who covers it}
    cluster_status: Callable[[], dict] = dict
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    access_log: Callable[[str], None] | None = None  # gets one line per finished /v1 request

    def ready(self, engine: Engine, cluster_status: Callable[[], dict] = dict) -> None:
        self.cluster_status = cluster_status
        engine.on_step = lambda rows, seconds: self.metrics.step_rows.observe(rows)
        # Read at every scrape, so they agree with /health even when no step has run since a sequence left.
        self.metrics.running.set_function(lambda: engine.num_running)
        self.metrics.waiting.set_function(lambda: engine.num_waiting)
        self.engine = engine
        engine.start()

    def require_engine(self) -> Engine:
        if self.load_error:
            raise ApiError(503, f"the model failed to load: {self.load_error}", "server_error", code="load_failed")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry when GET /health says ok", "server_error",
                           code="loading")
        return self.engine


@dataclass
class Event:
    delta: TextDelta
    output: TokenOutput
    finish_reason: str | None


class Generation:
    """One request on the engine, read from the event loop. Cancels its sequence if abandoned."""

    def __init__(self, service: Service, http: HttpRequest, request: Request, text: TextStream,
                 prompt_param: str = "prompt"):
        """prompt_param: the body field that carried the prompt, named in errors about it."""
        self.service, self.http, self.text = service, http, text
        self.engine = service.require_engine()
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.error: str | None = None  # why it ended early, for the access line
        http.state.generation = self
        self.completion_tokens = 0
        self.prompt_tokens = len(request.prompt)
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

        def deliver(output) -> None:  # runs on the engine's thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, output)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                self.engine.cancel(self.sequence)
        try:
            self.sequence = self.engine.submit(request, deliver)
        except EngineFull as e:
            raise ApiError(503, f"the server is at capacity: {e}", "server_error", code="server_busy") from None
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), param=prompt_param if e.field == "prompt" else e.field,
                           code="context_length_exceeded") from None
        except ValueError as e:  # another request the engine can never run (empty prompt, unknown token ids)
            raise ApiError(400, str(e), param="prompt") from None
        service.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                output = await self._next()
                if isinstance(output, SequenceFailed):
                    self.error = str(output)
                    raise ApiError(503, f"generation failed: {output}", "server_error", code="worker_failed")
                self._count(output)
                delta = self.text.add(output.token)
                finish = output.finish_reason
                if self.text.stopped and finish is None:
                    finish = "stop"  # a stop string: the engine need not go on
                    self.engine.cancel(self.sequence)
                if finish is not None:
                    rest = self.text.finish()
                    delta = TextDelta(delta.content + rest.content, delta.reasoning + rest.reasoning)
                yield Event(delta, output, finish)
                if finish is not None:
                    return
        finally:
            self.engine.cancel(self.sequence)  # a no-op once finished; frees the KV cache if the client left

    async def _next(self):
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await self.http.is_disconnected():
                    raise asyncio.CancelledError("the client went away") from None

    def _count(self, output: TokenOutput) -> None:
        now = time.perf_counter()
        metrics = self.service.metrics
        if self.last_token_at is None:
            self.first_token_at = now
            metrics.time_to_first_token.observe(now - self.arrived)
        else:
            metrics.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now
        self.completion_tokens += 1
        metrics.generated_tokens.inc()

    def summary(self) -> str:
        """Token counts and speed for the access line."""
        parts = [f"{self.prompt_tokens} prompt + {self.completion_tokens} generated tokens"]
        if self.first_token_at is not None:
            parts.append(f"first after {self.first_token_at - self.arrived:.2f} s")
        if self.completion_tokens > 1:
            rate = (self.completion_tokens - 1) / max(self.last_token_at - self.first_token_at, 1e-9)
            parts.append(f"{rate:.1f} tokens/s")
        if self.error:
            parts.append(f"failed: {self.error}")
        return ", ".join(parts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _log_when_done(log: Callable[[str], None], http: HttpRequest, response: Response, started: float) -> Response:
    """Log one line for the request once its response is complete (a stream: once its last event is sent)."""
    def write() -> None:
        line = f"{http.method} {http.url.path} {response.status_code} in {time.perf_counter() - started:.2f} s"
        generation = getattr(http.state, "generation", None)
        log(line if generation is None else f"{line}: {generation.summary()}")

    body = response.body_iterator  # call_next streams every response, whole or not

    async def logged():
        try:
            async for chunk in body:
                yield chunk
        finally:
            write()
    response.body_iterator = logged()
    return response


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _error_event(error: ApiError) -> bytes:
    return _sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})


# ---- the app ----

def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="kimi-cluster", description="OpenAI-compatible API for Kimi K2.x on a cluster",
                  docs_url=None, redoc_url=None)
    tokenizer = service.tokenizer
    markers = reasoning_markers(tokenizer, tokenizer.chat_template)  # <think> ids, if the template reasons

    @app.middleware("http")
    async def count_and_authorize(http: HttpRequest, call_next):
        endpoint = http.url.path
        if service.api_key and endpoint.startswith("/v1/") and not secrets.compare_digest(
                http.headers.get("authorization", ""), f"Bearer {service.api_key}"):
            response = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        else:
            response = await call_next(http)
        if endpoint.startswith("/v1/"):
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            if service.access_log is not None:
                response = _log_when_done(service.access_log, http, response, time.perf_counter())
        return response

    @app.exception_handler(ApiError)
    async def api_error(http: HttpRequest, error: ApiError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(http: HttpRequest, error: HTTPException):
        return ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None
                        ).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(http: HttpRequest, error: RequestValidationError):
        return _validation_error(error.errors()).response()

    @app.get("/health")
    async def health():
        if service.load_error:
            return JSONResponse({"status": "error", "error": service.load_error}, status_code=503)
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        cluster = await asyncio.to_thread(service.cluster_status)
        workers, down = cluster.get("workers", {}), cluster.get("down", {})
        # Degraded still serves: lost workers' experts are computed elsewhere until they are back.
        ok = not down and all(state == "ok" for state in workers.values())
        body = {"status": "ok" if ok else "degraded", "workers": workers,
                "running": service.engine.num_running, "waiting": service.engine.num_waiting}
        if down:
            body["down"] = down
            if cluster.get("recovery_error"):
                body["recovery_error"] = cluster["recovery_error"]
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(service, model_id)
        return _model_card(service)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await _parse(http, CompletionBody, service)
        prompt = await asyncio.to_thread(_completion_prompt, tokenizer, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        request = _engine_request(service, prompt, max_tokens, body, body.logprobs)
        generation = Generation(service, http, request, _text_stream(service, body))
        make = CompletionChunks(service, generation, body, tokenizer)
        return await _respond(body.stream, generation, make)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await _parse(http, ChatBody, service)
        rendered = await asyncio.to_thread(_render_chat, tokenizer, body.messages)
        prompt = await asyncio.to_thread(tokenizer.encode, rendered, True)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(service.context_size - len(prompt), 1)
        top = (body.top_logprobs or 0) if body.logprobs else None
        request = _engine_request(service, prompt, max_tokens, body, top)
        text = _text_stream(service, body, markers, in_reasoning=rendered.rstrip().endswith(THINK_OPEN))
        generation = Generation(service, http, request, text, prompt_param="messages")
        return await _respond(body.stream, generation, ChatChunks(service, generation, body, tokenizer))

    return app


async def _parse(http: HttpRequest, body_type: type[_Body], service: Service) -> _Body:
    """The request body, validated: JSON, field types and ranges, no unsupported fields, the served model."""
    raw = await http.body()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = body_type.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None
    body.refuse_unsupported()
    _check_model(service, body.model)
    return body


def _refuse_constant(name: str):
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def _validation_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    # Union members each report a failure; name the field once with pydantic's first reason.
    return ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param or None,
                    code="missing_required_parameter" if first["type"] == "missing" else "invalid_value")


def _model_card(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "kimi-cluster",
            "context_length": service.context_size}


def _check_model(service: Service, name: str | None) -> None:
    if name is not None and name != service.model_name:
        raise ApiError(404, f"the model '{name}' does not exist here; this server serves '{service.model_name}'",
                       param="model", code="model_not_found")


def _completion_prompt(tokenizer: Tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"got {len(prompt)} prompts; this server takes one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # As llama.cpp does for a raw prompt: special tokens parsed, BOS only if the file asks for it.
        return tokenizer.encode(prompt, parse_special=True)
    return list(prompt)


def _render_chat(tokenizer: Tokenizer, messages: list[ChatMessage]) -> str:
    plain = []
    for message in messages:
        entry = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):  # content parts: keep the text ones
            entry["content"] = "".join(part.get("text", "") for part in message.content if part.get("type") == "text")
        plain.append(entry)
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None


def _engine_request(service: Service, prompt: list[int], max_tokens: int, body: _Body, top_logprobs: int | None
                    ) -> Request:
    """The engine checks the prompt against the context and the vocabulary when the request is submitted."""
    try:
        params = body.sampling()
    except SamplingParamError as e:
        raise ApiError(400, f"invalid value for '{e.field}': must be {e.allowed}, got {e.value!r}", param=e.field,
                       code="invalid_value") from None
    stop_tokens = frozenset() if body.ignore_eos else service.tokenizer.eog_ids
    return Request(tuple(prompt), max_tokens, params, stop_tokens, top_logprobs)


def _text_stream(service: Service, body: _Body, markers=None, in_reasoning: bool = False) -> TextStream:
    return TextStream(service.tokenizer, body.stop_strings(), service.tokenizer.eog_ids, markers, in_reasoning)


async def _respond(stream: bool, generation: Generation, chunks: "CompletionChunks | ChatChunks"):
    if stream:
        async def sse() -> AsyncIterator[bytes]:
            try:
                for first in chunks.opening():
                    yield _sse(first)
                async for event in generation.events():
                    yield _sse(chunks.chunk(event))
                if chunks.body.include_usage:
                    yield _sse(chunks.usage_chunk())
            except ApiError as e:
                yield _error_event(e)
            yield _sse("[DONE]")
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    events = [event async for event in generation.events()]
    return chunks.whole(events)


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

    def chunk(self, event: Event) -> dict:
        delta = {}
        if event.delta.reasoning:
            delta["reasoning_content"] = event.delta.reasoning
        if event.delta.content or not event.delta.reasoning:
            delta["content"] = event.delta.content
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs([event]), "finish_reason": event.finish_reason}
        return self._envelope(self.object_chunk, [choice])

    def whole(self, events: list[Event]) -> dict:
        message = {"role": "assistant", "content": "".join(e.delta.content for e in events)}
        reasoning = "".join(e.delta.reasoning for e in events)
        if reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(events),
                  "finish_reason": events[-1].finish_reason}
        return {**self._envelope(self.object_whole, [choice]), "usage": self.generation.usage()}


# ---- running the server ----

class ApiServer:
    """uvicorn on a background thread, so the caller's thread can bring the model up meanwhile. The socket is
    bound here, before uvicorn starts, so that a port in use is one clear error rather than uvicorn's log."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000):
        self.socket = _listening_socket(host, port)
        config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="http",
                                        daemon=True)

    def start(self, timeout_s: float = 30) -> int:
        """Start serving; returns the port (useful with port 0)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self.socket.getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use (another server?); stop that program or "
                          "choose another port with --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from None
    return sock
