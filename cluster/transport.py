"""gRPC between the head and its expert workers: the servicer wrapping an ExpertShard, and RemoteExperts,
the head's Experts implementation that fans each layer out to the workers holding the chosen experts.

Per layer, RemoteExperts sends every worker one request with only the rows it needs (all sent before
any reply is awaited), computes the head's own share meanwhile, then adds the partial sums. A worker
that errors or misses the deadline raises WorkerFailed naming its node: never a hang.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent import futures
from typing import Callable, Iterator, Mapping

import grpc
import msgpack
import numpy as np

from protos import expert_pb2, expert_pb2_grpc
from runtime.experts import ExpertShard

TOKEN_HEADER = "x-kimi-token"
MAX_MESSAGE_BYTES = 512 << 20  # a 512-token prefill of K2 is 14.7 MB per direction in f32
WIRE_DTYPES = {"f32": expert_pb2.F32, "f16": expert_pb2.F16, "bf16": expert_pb2.BF16}
ITEM_BYTES = {expert_pb2.F32: 4, expert_pb2.F16: 2, expert_pb2.BF16: 2}
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class WorkerFailed(RuntimeError):
    """An expert worker that errored, died or missed its deadline."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"expert worker on node {node} failed: {reason}")
        self.node = node


def encode(array: np.ndarray, dtype: int) -> bytes:
    """float32 rows -> wire bytes (bf16 keeps the top half of each float32, rounded to nearest even)."""
    if dtype == expert_pb2.F16:
        return array.astype(np.float16).tobytes()
    if dtype == expert_pb2.BF16:
        bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16).tobytes()
    return np.ascontiguousarray(array, np.float32).tobytes()


def decode(data: bytes, dtype: int, width: int) -> np.ndarray:
    if dtype == expert_pb2.F16:
        values = np.frombuffer(data, np.float16).astype(np.float32)
    elif dtype == expert_pb2.BF16:
        values = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(data, np.float32)
    return values.reshape(-1, width)


# ---- worker side ----

# Requests up to this many (row, expert) pairs are computed on the server's event loop: a decode step's
# share takes milliseconds, less than a hop to another thread and back costs. Bigger ones (prefill) run
# in a thread, so Health keeps answering while they compute.
INLINE_PAIRS = 256


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry the cluster token."""

    def __init__(self, token: str):
        self._token = token

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token (x-kimi-token)")
        # The refusal must have the same streaming shape as the method it replaces.
        self._deny = {"Forward": grpc.stream_stream_rpc_method_handler(deny),
                      "LoadShard": grpc.stream_unary_rpc_method_handler(deny)}
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        if (TOKEN_HEADER, self._token) in (handler_call_details.invocation_metadata or ()):
            return await continuation(handler_call_details)
        return self._deny.get(handler_call_details.method.rsplit("/", 1)[-1], self._deny_unary)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Serves a shard once `shard()` returns one; `receive` handles streamed weights (LoadShard)."""

    def __init__(self, node: str, shard: Callable[[], ExpertShard | None],
                 receive: Callable[[Iterator[tuple[bytes, bytes]]], int],
                 health: Callable[[], dict]):
        self.node, self._shard, self._receive, self._health = node, shard, receive, health
        self._stats = {"requests": 0, "rows": 0, "pairs": 0, "compute_s": 0.0}

    async def Forward(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        async for request in request_iterator:
            if len(request.pair_rows) // 4 <= INLINE_PAIRS:
                yield self._forward_one(request)
            else:
                yield await loop.run_in_executor(None, self._forward_one, request)

    def _forward_one(self, request) -> expert_pb2.ForwardReply:
        shard = self._shard()
        if shard is None:
            return expert_pb2.ForwardReply(step=request.step, error=f"node {self.node}: shard not loaded yet")
        started = time.perf_counter()
        try:
            rows = np.frombuffer(request.pair_rows, np.int32)
            width = len(request.hidden) // (max(request.num_rows, 1) * ITEM_BYTES[request.dtype])
            hidden = decode(request.hidden, request.dtype, width)
            partial = shard.forward_pairs(request.layer, hidden, rows, np.frombuffer(request.pair_experts, np.int32),
                                          np.frombuffer(request.pair_weights, np.float32))
        except (KeyError, ValueError) as e:
            return expert_pb2.ForwardReply(step=request.step, error=f"node {self.node}: {e}")
        self._stats["requests"] += 1
        self._stats["rows"] += int(request.num_rows)
        self._stats["pairs"] += len(rows)
        self._stats["compute_s"] += time.perf_counter() - started
        return expert_pb2.ForwardReply(step=request.step, partial=encode(partial, request.dtype))

    def LoadShard(self, request_iterator, context):
        # A plain function: the server runs it in its thread pool, where writing gigabytes to disk blocks no one.
        try:
            received = self._receive((chunk.manifest, chunk.data) for chunk in request_iterator)
        except (ValueError, OSError) as e:
            return expert_pb2.LoadReply(ok=False, error=f"node {self.node}: {e}")
        return expert_pb2.LoadReply(ok=True, bytes_received=received)

    async def Health(self, request, context):
        return expert_pb2.HealthReply(node=self.node, **self._health())

    async def Stats(self, request, context):
        return expert_pb2.StatsReply(snapshot=msgpack.packb(self._stats))


class ExpertServer:
    """A gRPC server for an ExpertServicer on an event loop of its own thread.

    asyncio rather than grpc's thread-pool server: each message then stays on one thread, where the
    thread-pool server hands it between its polling and handler threads (measured side by side on
    loopback: 0.40 -> 0.36 ms per round trip for one token). LoadShard, a plain function, runs in the
    `threads` pool.
    """

    def __init__(self, servicer: ExpertServicer, address: str, token: str, tls: Mapping[str, str] | None,
                 threads: int):
        self._loop = asyncio.new_event_loop()
        self._stopped = False
        threading.Thread(target=self._loop.run_forever, daemon=True, name="expert-server").start()
        try:
            self.port = self._run(self._start(servicer, address, token, tls, threads))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self, servicer, address, token, tls, threads) -> int:
        self._server = grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(max_workers=threads),
                                       interceptors=[_TokenCheck(token)], options=_CHANNEL_OPTIONS)
        expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, self._server)
        if tls:
            with open(tls["key"], "rb") as key, open(tls["cert"], "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            bound = self._server.add_secure_port(address, credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}: is another worker running there?")
        await self._server.start()
        return bound

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (open streams are cancelled after `grace` seconds) and end the loop's thread."""
        if self._stopped:
            return
        self._stopped = True
        self._run(self._server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)


def serve(servicer: ExpertServicer, port: int, token: str, tls: Mapping[str, str] | None = None,
          threads: int = 4, host: str = "[::]") -> tuple[ExpertServer, int]:
    """Start a gRPC server for the servicer on `host` (default: every interface); port 0 picks a free one.
    Returns the server and its port."""
    server = ExpertServer(servicer, f"{host}:{port}", token, tls, threads)
    return server, server.port


# ---- head side ----

def open_channel(address: str, tls: Mapping[str, str] | None = None) -> grpc.Channel:
    if tls:
        with open(tls["ca"], "rb") as ca:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.read()), options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)


class WorkerClient:
    """One worker's long-lived Forward stream: send() never blocks, receive() waits up to the deadline.

    Replies are read on the caller's thread (a thread hop costs more than the whole loopback round
    trip); a watchdog thread cancels the stream when a reply is overdue, which ends the wait.
    """

    def __init__(self, node: str, address: str, token: str, deadline_s: float, tls: Mapping[str, str] | None = None):
        self.node, self.address, self.deadline_s = node, address, deadline_s
        self.metadata = ((TOKEN_HEADER, token),)
        self.channel = open_channel(address, tls)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = object()
        self._responses = self.stub.Forward(iter(self._requests.get, self._closed), metadata=self.metadata)
        self._waiting_since: float | None = None
        self._overdue = False
        self._failure: WorkerFailed | None = None
        threading.Thread(target=self._watch, daemon=True, name=f"watchdog-{node}").start()

    def _watch(self) -> None:
        while self._failure is None:
            time.sleep(min(0.05, self.deadline_s / 10))
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.deadline_s:
                self._overdue = True
                self._responses.cancel()
                return

    def send(self, request: expert_pb2.ForwardRequest) -> None:
        self._requests.put(request)

    def receive(self, step: int) -> expert_pb2.ForwardReply:
        if self._failure is not None:  # a failed stream stays failed: every later call says why
            raise self._failure
        self._waiting_since = time.monotonic()
        try:
            reply = next(self._responses)
        except StopIteration:
            self._failure = WorkerFailed(self.node, "the worker closed its stream")
        except grpc.RpcError as e:
            reason = (f"no answer within the {self.deadline_s:g} s deadline" if self._overdue
                      else f"{e.code().name}: {e.details()}")
            self._failure = WorkerFailed(self.node, reason)
        finally:
            self._waiting_since = None
        if self._failure is not None:
            raise self._failure
        if reply.error:
            raise WorkerFailed(self.node, reply.error)
        if reply.step != step:
            raise WorkerFailed(self.node, f"answered step {reply.step} while step {step} was expected")
        return reply

    def health(self, timeout_s: float | None = None) -> expert_pb2.HealthReply:
        return self.stub.Health(expert_pb2.HealthRequest(), metadata=self.metadata,
                                timeout=timeout_s or self.deadline_s)

    def state(self, timeout_s: float = 2.0) -> str:
        """"ok", or why this worker cannot serve now (asked with a short deadline: health checks must not hang)."""
        if self._failure is not None:
            return str(self._failure)
        try:
            reply = self.health(timeout_s)
        except grpc.RpcError as e:
            return f"expert worker on node {self.node} does not answer: {e.code().name}"
        return "ok" if reply.ready else f"expert worker on node {self.node} is still loading"

    def stats(self) -> dict:
        reply = self.stub.Stats(expert_pb2.StatsRequest(), metadata=self.metadata, timeout=self.deadline_s)
        return msgpack.unpackb(reply.snapshot)

    def load_shard(self, chunks: Iterator[tuple[bytes, bytes]]) -> int:
        reply = self.stub.LoadShard((expert_pb2.ShardChunk(manifest=m, data=d) for m, d in chunks),
                                    metadata=self.metadata)
        if not reply.ok:
            raise WorkerFailed(self.node, reply.error)
        return reply.bytes_received

    def close(self) -> None:
        self._failure = self._failure or WorkerFailed(self.node, "the connection was closed")
        self._requests.put(self._closed)
        self.channel.close()


class RemoteExperts:
    """Experts spread over the head (an in-process shard) and remote workers (gRPC)."""

    def __init__(self, owners: Mapping[int, np.ndarray], workers: list[WorkerClient], local: ExpertShard | None,
                 wire_dtype: str = "f32"):
        self.owners = dict(owners)  # layer -> [num_experts] worker index, -1 = head
        self.workers, self.local = workers, local
        self.dtype = WIRE_DTYPES[wire_dtype]
        self._step = 0
        # Called as observer(node, pairs, round_trip_seconds) for every share of every layer; the head's own
        # share has no round trip (None). Metrics and benchmarks listen here.
        self.observers: list[Callable[[str, int, float | None], None]] = []

    def start(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Callable[[], np.ndarray]:
        # hidden [T, D]; ids, weights [T, k]
        self._step += 1
        step, owner = self._step, self.owners[layer][ids]  # [T, k]
        sent = []
        for index, worker in enumerate(self.workers):
            rows, request = self._request(layer, step, hidden, ids, weights, owner == index)
            if request is not None:
                worker.send(request)
                sent.append((worker, rows, len(request.pair_rows) // 4, time.perf_counter()))
        local_mask = owner < 0
        local_partial = None
        if self.local is not None and local_mask.any():
            t, j = np.nonzero(local_mask)
            local_partial = self.local.forward_pairs(layer, hidden, t.astype(np.int32), ids[t, j], weights[t, j])
            self._notify("head", len(t), None)

        def result() -> np.ndarray:
            total = np.zeros_like(hidden, dtype=np.float32) if local_partial is None else local_partial
            for worker, rows, pairs, sent_at in sent:
                reply = worker.receive(step)
                self._notify(worker.node, pairs, time.perf_counter() - sent_at)
                total[rows] += decode(reply.partial, self.dtype, hidden.shape[1])
            return total
        return result

    def graph_weights(self, layer: int, slots: int) -> None:
        return None  # the experts are spread over processes: the head's graph stops at their router

    def _notify(self, node: str, pairs: int, round_trip_s: float | None) -> None:
        for observer in self.observers:
            observer(node, pairs, round_trip_s)

    def _request(self, layer, step, hidden, ids, weights, mask):
        """The rows a worker needs and their (row, expert, weight) pairs, in slot order per row."""
        rows = np.nonzero(mask.any(axis=1))[0]
        if len(rows) == 0:
            return rows, None
        t, j = np.nonzero(mask[rows])
        return rows, expert_pb2.ForwardRequest(
            layer=layer, step=step, num_rows=len(rows), dtype=self.dtype, hidden=encode(hidden[rows], self.dtype),
            pair_rows=t.astype(np.int32).tobytes(), pair_experts=ids[rows][t, j].astype(np.int32).tobytes(),
            pair_weights=weights[rows][t, j].astype(np.float32).tobytes())

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
