"""The service every protocol serves through: the engine (None until the model has loaded), the tokenizer,
the API key, metrics and the cluster's state; and Generation, one request on the engine as the event loop
reads it.

Requests run on the Engine's background loop; each one's tokens come back to the event loop through an
asyncio queue. While a request waits for its tokens, its connection is watched: a client that goes away
cancels its sequence (between prefill chunks, so a long prompt it abandoned stops at once), and a stream
gets a keep-alive every heartbeat_s while it waits (a long prompt's prefill), so clients do not give up.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request as HttpRequest

from cluster.server.errors import ApiError
from cluster.server.metrics import ServerMetrics
from runtime.engine import (ContextLengthExceeded, Engine, EngineFull, EngineStopped, Request, SequenceFailed,
                            TokenOutput)
from runtime.grammar import Grammar, GrammarTokenizer
from runtime.sampling import SamplingParams
from runtime.text_output import TextDelta, TextStream
from runtime.tokenizer import Tokenizer
from runtime.tool_calls import ToolCallParser

DISCONNECT_CHECK_S = 0.5  # how often a waiting request asks whether its client is still there


@dataclass
class Service:
    """What the API serves. `engine` is None until the model has loaded."""
    model_name: str
    tokenizer: Tokenizer
    context_size: int  # tokens a sequence holds; the engine's, once ready
    quantization: str | None = None  # the file's type as llama.cpp names it ("Q4_K_M"), for /v1/models
    file_bytes: int | None = None  # the model file's size, all its parts
    api_key: str | None = None
    protect_metrics: bool = False  # ask for the key on /health and /metrics too
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    # {"workers": node -> "ok" or what is wrong, "down": node -> why, since when, who covers it}
    cluster_status: Callable[[], dict] = dict
    # The dashboard's: {"nodes", "placement", "heat", "events"} (cluster/cluster_view.py)
    cluster_view: Callable[[], dict] = dict
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    access_log: Callable[[str], None] | None = None  # gets one line per finished /v1 request, and notes
    # Any model name is this model, as llama-server does (coding agents send their own names); True refuses them.
    strict_model_name: bool = False
    heartbeat_s: float = 10.0  # a stream waiting this long for a token gets a keep-alive
    _grammars: GrammarTokenizer | None = field(default=None, repr=False)

    def grammars(self) -> GrammarTokenizer:
        """The vocabulary for constrained decoding, built on first use (about 0.6 s at 163,840 tokens)."""
        if self._grammars is None:
            self._grammars = GrammarTokenizer(self.tokenizer)
        return self._grammars

    def ready(self, engine: Engine, cluster_status: Callable[[], dict] = dict,
              cluster_view: Callable[[], dict] = dict) -> None:
        self.cluster_status, self.cluster_view = cluster_status, cluster_view
        self.context_size = engine.context_size  # the plan decides it while the model loads
        engine.on_step = lambda rows, seconds: self.metrics.step_rows.observe(rows)
        # Read at every scrape, so they agree with /health even when no step has run since a sequence left.
        self.metrics.running.set_function(lambda: engine.num_running)
        self.metrics.waiting.set_function(lambda: engine.num_waiting)
        self.metrics.watch_speculation(engine)
        self.engine = engine
        engine.start()

    def note(self, line: str) -> None:
        """A line for the console about a request (something it asked for that was left out)."""
        if self.access_log is not None:
            self.access_log(f"note: {line}")

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
            # A coding agent's prompt outgrows a small context: its user is usually the one who starts the server.
            advice = f" (or start the server with --context above {self.prompt_tokens})" if e.field == "prompt" else ""
            raise ApiError(400, f"{e}{advice}", param=prompt_param if e.field == "prompt" else e.field,
                           code="context_length_exceeded") from None
        except ValueError as e:  # another request the engine can never run (empty prompt, unknown token ids)
            raise ApiError(400, str(e), param="prompt") from None
        service.metrics.prompt_tokens.inc(self.prompt_tokens)

    async def events(self, heartbeat: bool = False) -> AsyncIterator[Event | None]:
        """The reply's events; with heartbeat, also None whenever the service's heartbeat_s pass without one."""
        try:
            while True:
                output = await self._next(heartbeat)
                if output is None:
                    yield None
                    continue
                if isinstance(output, SequenceFailed):
                    self.error = str(output)
                    stopped = isinstance(output.cause, EngineStopped)
                    raise ApiError(503, f"generation failed: {output}", "server_error",
                                   code="shutting_down" if stopped else "worker_failed")
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
                    self._note_dropped_calls()
                yield Event(delta, output, finish)
                if finish is not None:
                    return
        finally:
            self.engine.cancel(self.sequence)  # a no-op once finished; frees the KV cache if the client left

    def _note_dropped_calls(self) -> None:
        """A tool-call section that broke after complete calls ends at them (text_output.py): say what was left
        out, as the client cannot see it."""
        tools = self.text.tools
        if tools is not None and tools.calls and tools.malformed:
            self.service.note(f"kept the reply's first {len(tools.calls)} tool calls and left out the rest of its "
                              f"tool-call section: {tools.malformed}")

    async def _next(self, heartbeat: bool):
        """The next output, or None after heartbeat_s without one (with heartbeat)."""
        waited = 0.0
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                if await self.http.is_disconnected():
                    raise asyncio.CancelledError("the client went away") from None
                waited += DISCONNECT_CHECK_S
                if heartbeat and waited >= self.service.heartbeat_s:
                    return None

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
        if self.completion_tokens == 1:
            metrics.reused_prompt_tokens.inc(self.cached_tokens)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens taken from an earlier request's cache rather than computed (known once it started)."""
        return self.sequence.reused

    def summary(self) -> str:
        """Token counts and speed for the access line."""
        reused = f" ({self.cached_tokens} reused)" if self.cached_tokens else ""
        parts = [f"{self.prompt_tokens} prompt{reused} + {self.completion_tokens} generated tokens"]
        if self.first_token_at is not None:
            parts.append(f"first after {self.first_token_at - self.arrived:.2f} s")
        if self.completion_tokens > 1:
            rate = (self.completion_tokens - 1) / max(self.last_token_at - self.first_token_at, 1e-9)
            parts.append(f"{rate:.1f} tokens/s")
        if self.sequence.drafted:
            parts.append(f"{self.sequence.accepted}/{self.sequence.drafted} drafted tokens accepted")
        if self.error:
            parts.append(f"failed: {self.error}")
        return ", ".join(parts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def engine_request(service: Service, prompt: list[int], max_tokens: int, params: SamplingParams,
                   ignore_eos: bool = False, top_logprobs: int | None = None,
                   banned_tokens: frozenset[int] = frozenset(), grammar: Grammar | None = None) -> Request:
    """The engine checks the prompt against the context and the vocabulary when the request is submitted. A
    prompt that fits gets at most the rest of the context to write in, as llama-server does."""
    stop_tokens = frozenset() if ignore_eos else service.tokenizer.eog_ids
    room = service.context_size - len(prompt)
    if room > 0:
        max_tokens = min(max_tokens, room)
    return Request(tuple(prompt), max_tokens, params, stop_tokens, top_logprobs, banned_tokens, grammar)


def text_stream(service: Service, stop_strings: list[str], markers=None, in_reasoning: bool = False,
                tools: ToolCallParser | None = None, forced: list[int] = ()) -> TextStream:
    """The reply's text; `forced`: tokens the prompt wrote at the start of the reply (a forced tool call)."""
    stream = TextStream(service.tokenizer, stop_strings, service.tokenizer.eog_ids, markers, in_reasoning, tools)
    stream.force(forced)
    return stream
