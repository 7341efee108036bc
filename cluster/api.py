"""The HTTP server: one service shared by every protocol (the engine, request checks, errors, access lines,
/health and /metrics), and a module of routes per protocol: OpenAI's (openai_api.py) and Anthropic's
Messages API (anthropic_api.py).

Requests run on the Engine's background loop; each one's tokens come back to the event loop through an
asyncio queue. An error is an ApiError, rendered in the shape of the protocol whose path was asked for.
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
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from cluster.metrics import ServerMetrics
from runtime.engine import ContextLengthExceeded, Engine, EngineFull, Request, SequenceFailed, TokenOutput
from runtime.grammar import Grammar, GrammarTokenizer
from runtime.sampling import SamplingParamError, SamplingParams
from runtime.text_output import TextDelta, TextStream
from runtime.tokenizer import Tokenizer
from runtime.tool_calls import ToolCallParser

Body = TypeVar("Body", bound=BaseModel)
OPEN_PATHS = ("/health", "/metrics")  # open to monitoring without the API key, unless protect_metrics


class ApiError(Exception):
    """A request that fails: the HTTP status, what is wrong and what to do, and which field."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ApiProtocol(Protocol):
    """What a protocol module gives the app: its routes, the paths they live under, and its error shape."""
    PATHS: tuple[str, ...]

    def routes(self, service: "Service") -> APIRouter: ...

    def error_body(self, error: ApiError) -> dict: ...


# ---- the service behind the routes ----

@dataclass
class Service:
    """What the API serves. `engine` is None until the model has loaded."""
    model_name: str
    tokenizer: Tokenizer
    context_size: int
    api_key: str | None = None
    protect_metrics: bool = False  # ask for the key on /health and /metrics too
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    # {"workers": node -> "ok" or what is wrong, "down": node -> why, since when, who covers it}
    cluster_status: Callable[[], dict] = dict
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    access_log: Callable[[str], None] | None = None  # gets one line per finished /v1 request
    _grammars: GrammarTokenizer | None = field(default=None, repr=False)

    def grammars(self) -> GrammarTokenizer:
        """The vocabulary for constrained decoding, built on first use (about 0.6 s at 163,840 tokens)."""
        if self._grammars is None:
            self._grammars = GrammarTokenizer(self.tokenizer)
        return self._grammars

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
                    delta = delta + self.text.finish()
                    if finish == "stop" and self.text.called_tools:
                        finish = "tool_calls"
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


def _log_when_done(log: Callable[[str], None], http: HttpRequest, response: Response, started: float
                   ) -> Response:
    """Log one line for the request once its response is complete (a stream: once its last event is sent)."""
    def write() -> None:
        line = f"{http.method} {http.url.path} {response.status_code} in {time.perf_counter() - started:.2f} s"
        generation = getattr(http.state, "generation", None)
        log(line if generation is None else f"{line}: {generation.summary()}")

    if not hasattr(response, "body_iterator"):  # whole, made here (a refused key): nothing left to send
        write()
        return response
    body = response.body_iterator  # what call_next gives streams, whole or not

    async def logged():
        try:
            async for chunk in body:
                yield chunk
        finally:
            write()
    response.body_iterator = logged()
    return response


# ---- request checks shared by the protocols ----

async def parse_body(http: HttpRequest, body_type: type[Body]) -> Body:
    """The request body as `body_type`: JSON (NaN and Infinity refused), field types and ranges."""
    raw = await http.body()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return body_type.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _refuse_constant(name: str):
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def validation_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    # Union members each report a failure; name the field once with pydantic's first reason.
    return ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param or None,
                    code="missing_required_parameter" if first["type"] == "missing" else "invalid_value")


def check_model(service: Service, name: str | None) -> None:
    if name is not None and name != service.model_name:
        raise ApiError(404, f"the model '{name}' does not exist here; this server serves '{service.model_name}'",
                       param="model", code="model_not_found")


def sampling_params(**settings: Any) -> SamplingParams:
    """SamplingParams, with a setting it refuses as a 400 that names the field."""
    try:
        return SamplingParams(**settings)
    except SamplingParamError as e:
        raise ApiError(400, f"invalid value for '{e.field}': must be {e.allowed}, got {e.value!r}", param=e.field,
                       code="invalid_value") from None


def engine_request(service: Service, prompt: list[int], max_tokens: int, params: SamplingParams,
                   ignore_eos: bool = False, top_logprobs: int | None = None,
                   banned_tokens: frozenset[int] = frozenset(), grammar: Grammar | None = None) -> Request:
    """The engine checks the prompt against the context and the vocabulary when the request is submitted."""
    stop_tokens = frozenset() if ignore_eos else service.tokenizer.eog_ids
    return Request(tuple(prompt), max_tokens, params, stop_tokens, top_logprobs, banned_tokens, grammar)


def text_stream(service: Service, stop_strings: list[str], markers=None, in_reasoning: bool = False,
                tools: ToolCallParser | None = None, forced: list[int] = ()) -> TextStream:
    """The reply's text; `forced`: tokens the prompt wrote at the start of the reply (a forced tool call)."""
    stream = TextStream(service.tokenizer, stop_strings, service.tokenizer.eog_ids, markers, in_reasoning, tools)
    stream.force(forced)
    return stream


# ---- the app ----

def create_app(service: Service, protocols: tuple[ApiProtocol, ...] | None = None) -> FastAPI:
    """The app serving every protocol's routes (OpenAI's and Anthropic's unless told), /health and /metrics."""
    if protocols is None:
        from cluster import anthropic_api, openai_api
        protocols = (openai_api, anthropic_api)
    app = FastAPI(title="kimi-cluster", description="OpenAI-compatible API for Kimi K2.x on a cluster",
                  docs_url=None, redoc_url=None)

    def error_response(http: HttpRequest, error: ApiError) -> JSONResponse:
        """In the shape of the protocol the path belongs to (the first one's for other paths)."""
        path = http.url.path
        protocol = next((p for p in protocols if path.startswith(p.PATHS)), protocols[0])
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(protocol.error_body(error), status_code=error.status, headers=headers)

    @app.middleware("http")
    async def count_and_authorize(http: HttpRequest, call_next):
        endpoint = http.url.path
        left_open = not service.protect_metrics and endpoint in OPEN_PATHS
        if service.api_key and not left_open and not _key_matches(http, service.api_key):
            response = error_response(http, ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                          "<key>' or 'x-api-key: <key>'", code="invalid_api_key"))
        else:
            response = await call_next(http)
        if endpoint.startswith("/v1/"):
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            if service.access_log is not None:
                response = _log_when_done(service.access_log, http, response, time.perf_counter())
        return response

    @app.exception_handler(ApiError)
    async def api_error(http: HttpRequest, error: ApiError):
        return error_response(http, error)

    @app.exception_handler(HTTPException)
    async def http_error(http: HttpRequest, error: HTTPException):
        return error_response(http, ApiError(error.status_code, str(error.detail),
                                             code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(http: HttpRequest, error: RequestValidationError):
        return error_response(http, validation_error(error.errors()))

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

    for protocol in protocols:
        app.include_router(protocol.routes(service))
    return app


def _key_matches(http: HttpRequest, key: str) -> bool:
    """As a bearer token (OpenAI's clients) or in x-api-key (Anthropic's), compared in constant time."""
    bearer = secrets.compare_digest(http.headers.get("authorization", "").encode(), f"Bearer {key}".encode())
    header = secrets.compare_digest(http.headers.get("x-api-key", "").encode(), key.encode())
    return bearer or header


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
