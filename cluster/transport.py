"""gRPC between the head and its expert workers: the servicer wrapping an ExpertShard, and RemoteExperts,
the head's Experts implementation that fans each layer out to the workers holding the chosen experts.

Per layer, RemoteExperts sends every worker one request with only the rows it needs (all sent before
any reply is awaited), computes the head's own share meanwhile, then adds the partial sums. A worker
that errors or misses its deadline is down: its share goes to replicas or the head (failover.py), and
only experts nobody can compute fail the step, naming the nodes: never a hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import grpc
import msgpack
import numpy as np

from protos import expert_pb2, expert_pb2_grpc
from cluster.failover import FailoverState, HeadFallback
from runtime.experts import ExpertShard, sum_pairs

TOKEN_HEADER = "x-kimi-token"
MAX_MESSAGE_BYTES = 512 << 20  # a 512-token prefill of K2 is 14.7 MB per direction in f32
WIRE_DTYPES = {"f32": expert_pb2.F32, "f16": expert_pb2.F16, "bf16": expert_pb2.BF16}
ITEM_BYTES = {expert_pb2.F32: 4, expert_pb2.F16: 2, expert_pb2.BF16: 2}
DEADLINE_PAIRS = 512  # a request gets deadline_s per this many (token, expert) pairs begun
CANCEL_GRACE_S = 1.0  # how long a cancelled wait may take to end before the channel is closed under it
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
            # Mutual TLS: only clients with a certificate from the cluster's CA get through (then the token).
            key, cert, ca = (_read(tls[kind], kind) for kind in ("key", "cert", "ca"))
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
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
    """To a worker: with `tls`, the worker's certificate must come from the CA, and this end shows its own
    (a worker refuses a client without one)."""
    if tls:
        key, cert, ca = (_read(tls[kind], kind) if tls.get(kind) else None for kind in ("key", "cert", "ca"))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)


def ask_ray_without_token(gcs_address: str) -> str:
    """How a Ray GCS answers a request for its cluster id that carries no token: "OK" (the cluster is open),
    "UNAUTHENTICATED" (it is in token mode), or another gRPC status name (e.g. "UNAVAILABLE")."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    with grpc.insecure_channel(gcs_address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code().name
        return "OK"


def _read(path: str, kind: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as e:
        raise OSError(f"cannot read the TLS {kind} file {path}: {e.strerror}; make the certificates with "
                      "`kimi-cluster certs`") from None


class WorkerClient:
    """One worker's long-lived Forward stream: send() never blocks and returns a ticket; receive(ticket)
    waits for that request's reply (replies come in request order) up to its deadline.

    Replies are read on the caller's thread (a thread hop costs more than the whole loopback round
    trip); a watchdog thread cancels the stream when a wait for a reply outlasts that request's deadline,
    which ends the wait. The clock starts when the head begins to wait, not when it sent: a reply that
    came while the head was waiting on another worker is not late. A failed client stays failed: the
    head makes a new one when the worker is back.
    """

    def __init__(self, node: str, address: str, token: str, deadline_s: float, tls: Mapping[str, str] | None = None):
        self.node, self.address, self.deadline_s = node, address, deadline_s
        self.metadata = ((TOKEN_HEADER, token),)
        self.channel = open_channel(address, tls)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = object()
        self._responses = self.stub.Forward(iter(self._requests.get, self._closed), metadata=self.metadata)
        self._sent = self._read = 0
        self._deadlines: dict[int, float] = {}  # seconds each unclaimed request may take
        self._wait_until: float | None = None
        self._unclaimed: dict[int, expert_pb2.ForwardReply] = {}
        self._overdue = False
        self._failure: WorkerFailed | None = None
        threading.Thread(target=self._watch, daemon=True, name=f"watchdog-{node}").start()

    @property
    def failure(self) -> WorkerFailed | None:
        return self._failure

    def deadline_for(self, pairs: int) -> float:
        """deadline_s per DEADLINE_PAIRS (token, expert) pairs begun: prompt chunks compute longer than decode steps."""
        return self.deadline_s * max(1, math.ceil(pairs / DEADLINE_PAIRS))

    def _watch(self) -> None:
        while self._failure is None:
            time.sleep(min(0.05, self.deadline_s / 10))
            wait_until = self._wait_until
            if wait_until is not None and time.monotonic() > wait_until:
                self._overdue = True
                self._responses.cancel()
                # Should the cancelled stream not end the wait (gRPC has left a cancelled read waiting on a busy
                # process), closing the channel ends every call on it.
                time.sleep(CANCEL_GRACE_S)
                if self._wait_until == wait_until:
                    self.channel.close()
                return

    def send(self, request: expert_pb2.ForwardRequest) -> int:
        if self._failure is not None:
            raise self._failure
        self._sent += 1
        self._deadlines[self._sent] = self.deadline_for(len(request.pair_rows) // 4)
        self._requests.put(request)
        return self._sent

    def receive(self, ticket: int, step: int) -> expert_pb2.ForwardReply:
        if self._read < ticket:
            self._wait_until = time.monotonic() + self._deadlines.get(ticket, self.deadline_s)
        while self._read < ticket and self._failure is None:
            try:
                reply = next(self._responses)
            except StopIteration:
                self._failure = WorkerFailed(self.node, "the worker closed its stream")
            except grpc.RpcError as e:
                reason = ("no answer within its deadline" if self._overdue else f"{e.code().name}: {e.details()}")
                self._failure = WorkerFailed(self.node, reason)
            else:
                self._read += 1
                self._unclaimed[self._read] = reply
        self._wait_until = None
        self._deadlines.pop(ticket, None)
        reply = self._unclaimed.pop(ticket, None)
        if reply is None:  # never arrived (the stream failed), or claimed already
            raise self._failure or WorkerFailed(self.node, f"request {ticket} has no reply")
        if reply.error:
            raise WorkerFailed(self.node, reply.error)
        if reply.step != step:
            raise WorkerFailed(self.node, f"answered step {reply.step} while step {step} was expected")
        return reply

    def forget(self, ticket: int) -> None:
        """Read and drop the reply of a request nobody will claim (a step that ended early), so that
        later requests are not blamed for it."""
        with contextlib.suppress(WorkerFailed):
            self.receive(ticket, -1)

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


HEAD_SHARD, FALLBACK = -1, -2  # holders that are not workers: the head's planned shard, the head's file


class SharesLost(WorkerFailed):
    """No one can compute some experts: every holder is down and the head has no fallback."""

    def __init__(self, layer: int, experts: list[int], down: Mapping[str, str]):
        RuntimeError.__init__(self, f"experts {experts} of layer {layer} have no holder left and the head has no "
                                    "copy to compute them from; down: " +
                              "; ".join(f"{node} ({reason})" for node, reason in down.items()))
        self.node = ", ".join(down)


@dataclass
class _Share:
    """One planned worker's part of a layer: the hidden rows it needs and its (row, expert, weight) pairs,
    rows ascending and each row's pairs in slot order. `sent` holds what is in flight for it: per holder,
    the pairs it computes (None: the whole share, as one request) and the ticket of the request."""
    owner: int
    rows: np.ndarray
    pair_rows: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    sent: list = field(default_factory=list)


class RemoteExperts:
    """Experts spread over the head (an in-process shard) and remote workers (gRPC), surviving workers that fail.

    Each layer's pairs are split by planned owner (a share per worker). A share whose worker is down, or
    fails in flight, is computed by whoever else can: workers holding replicas of its experts, the head's
    own shard, then the head's fallback (its mapping of the file). Partial sums are always added share by
    share in the planned order, and a share split over several holders is computed pair by pair and summed
    as its worker would have, so a failover changes no bits (with the f32 wire and the worker's kernels).
    """

    def __init__(self, owners: Mapping[int, np.ndarray], workers: list[WorkerClient], local: ExpertShard | None,
                 wire_dtype: str = "f32", fallback: HeadFallback | None = None,
                 replicas: Mapping[int, Mapping[int, Sequence[int]]] | None = None,
                 state: FailoverState | None = None):
        self.owners = dict(owners)  # layer -> [num_experts] worker index, -1 = head
        self.workers, self.local, self.fallback = list(workers), local, fallback
        self.dtype = WIRE_DTYPES[wire_dtype]
        self.state = state or FailoverState()
        self.down: frozenset[int] = frozenset()  # indices of workers whose shares others compute
        self._down_lock = threading.Lock()
        # worker index -> layer -> [num_experts] bool: the copies of other workers' experts it holds, as
        # planned (replicas) and as taken over since (add_copies)
        self._planned_copies = {index: self._masks(per_layer) for index, per_layer in (replicas or {}).items()}
        self._copies = {index: dict(masks) for index, masks in self._planned_copies.items()}
        self._returning: dict[int, WorkerClient] = {}
        self._in_flight = False  # a layer is between start() and its result
        self._layer_lock = threading.Lock()
        self._step = 0
        # [num_layers, num_experts] (token, expert) pairs routed so far, for replicas: auto (routing_counts.py)
        self.routed = np.zeros((max(self.owners, default=-1) + 1, max((len(o) for o in self.owners.values()), default=0)),
                               np.int64)
        # Called as observer(node, pairs, round_trip_seconds) for every share of every layer; the head's own
        # share has no round trip (None). Metrics and benchmarks listen here.
        self.observers: list[Callable[[str, int, float | None], None]] = []

    def start(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Callable[[], np.ndarray]:
        # hidden [T, D]; ids, weights [T, k]
        with self._layer_lock:
            self._take_back_returning()
            self._in_flight = True
        self._step += 1
        self.routed[layer] += np.bincount(ids.ravel(), minlength=self.routed.shape[1])
        step, owner = self._step, self.owners[layer][ids]  # [T, k]
        shares = [share for index in range(len(self.workers))
                  if (share := self._share(index, ids, weights, owner == index)) is not None]
        for share in shares:
            self._send(layer, step, hidden, share)
        local_mask = owner < 0
        local_partial = None
        if self.local is not None and local_mask.any():
            t, j = np.nonzero(local_mask)
            local_partial = self.local.forward_pairs(layer, hidden, t.astype(np.int32), ids[t, j], weights[t, j])
            self._notify("head", len(t), None)

        def result() -> np.ndarray:
            total = np.zeros_like(hidden, dtype=np.float32) if local_partial is None else local_partial
            try:
                for share in shares:
                    total[share.rows] += self._collect(layer, step, hidden, share)
            finally:
                for share in shares:  # a step that failed leaves no replies to be misread later
                    self._forget(share)
                with self._layer_lock:
                    self._in_flight = False
            return total
        return result

    def graph_weights(self, layer: int, slots: int) -> None:
        return None  # the experts are spread over processes: the head's graph stops at their router

    # ---- failure and return ----

    def rejoin(self, index: int, client: WorkerClient) -> None:
        """A worker is back, serving its planned share: it takes it over now, or after the layer in flight
        (any thread)."""
        with self._layer_lock:
            self._returning[index] = client
            if not self._in_flight:
                self._take_back_returning()

    def add_copies(self, index: int, per_layer: Mapping[int, Sequence[int]]) -> None:
        """Worker `index` now also holds these experts (a lost worker's, taken over): it computes them
        whenever their own worker is down, from the next layer on (any thread)."""
        with self._layer_lock:
            masks = self._copies.setdefault(index, {})
            for layer, mask in self._masks(per_layer).items():
                masks[layer] = masks[layer] | mask if layer in masks else mask

    def _masks(self, per_layer: Mapping[int, Sequence[int]]) -> dict[int, np.ndarray]:
        masks = {}
        for layer, experts in per_layer.items():
            masks[layer] = np.zeros(len(self.owners[layer]), bool)
            masks[layer][list(experts)] = True
        return masks

    def rejoining(self, index: int) -> bool:
        return index in self._returning

    def _take_back_returning(self) -> None:
        returning, self._returning = self._returning, {}
        for index, client in returning.items():
            self.workers[index].close()
            self.workers[index] = client
            with self._down_lock:
                self.down = self.down - {index}
            # A restarted process holds what it was planned to; copies taken over since were lost with the old one.
            self._copies[index] = dict(self._planned_copies.get(index, {}))
            if self.fallback is not None:
                self.fallback.drop(index)
            self.state.rejoined(client.node)

    def mark_down(self, index: int, error: WorkerFailed) -> None:
        """From now on the worker's share is computed by others, until it rejoins (any thread: a wait on
        it in flight ends with the closed connection and is covered like any failure)."""
        with self._down_lock:
            if index in self.down:
                return
            self.down = self.down | {index}  # replaced, not changed: readers may hold the old set
        self.workers[index].close()
        self.state.failed(self.workers[index].node, str(error))

    # ---- one share ----

    def _share(self, index: int, ids: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> _Share | None:
        rows = np.nonzero(mask.any(axis=1))[0]
        if len(rows) == 0:
            return None
        t, j = np.nonzero(mask[rows])
        return _Share(index, rows, t.astype(np.int32), ids[rows][t, j].astype(np.int32),
                      weights[rows][t, j].astype(np.float32))

    def _send(self, layer: int, step: int, hidden: np.ndarray, share: _Share) -> None:
        """Send the share to its worker, or, when it is down, to whoever covers it (head parts wait for _collect)."""
        if share.owner not in self.down:
            try:
                ticket = self.workers[share.owner].send(self._request(layer, step, hidden, share, None))
                share.sent = [(share.owner, None, ticket, time.perf_counter())]
                return
            except WorkerFailed as e:
                self.mark_down(share.owner, e)
        share.sent = []
        for holder, pairs in self._cover(layer, share):
            ticket = None
            if holder >= 0:
                try:
                    ticket = self.workers[holder].send(self._request(layer, step, hidden, share, pairs))
                except WorkerFailed as e:
                    self.mark_down(holder, e)
            share.sent.append((holder, pairs, ticket, time.perf_counter()))

    def _collect(self, layer: int, step: int, hidden: np.ndarray, share: _Share) -> np.ndarray:
        """The share's partial sums [rows, D]; holders that fail meanwhile are replaced until one answers."""
        while True:
            try:
                return self._gather(layer, step, hidden, share)
            except WorkerFailed as e:
                self.mark_down(next(i for i, w in enumerate(self.workers) if w.node == e.node), e)
                self._forget(share)
                self._send(layer, step, hidden, share)

    def _forget(self, share: _Share) -> None:
        """Drop the replies still due for a share (from holders that are up), so none is misread later."""
        for holder, _, ticket, _ in share.sent:
            if holder >= 0 and ticket is not None and holder not in self.down:
                self.workers[holder].forget(ticket)
        share.sent = []

    def _gather(self, layer: int, step: int, hidden: np.ndarray, share: _Share) -> np.ndarray:
        whole = len(share.sent) == 1 and share.sent[0][1] is None
        outputs = None if whole else np.empty((len(share.experts), hidden.shape[1]), np.float32)
        for number, (holder, pairs, ticket, sent_at) in enumerate(share.sent):
            count = len(share.experts) if pairs is None else len(pairs)
            if holder >= 0:
                if ticket is None:
                    raise self.workers[holder].failure
                reply = self.workers[holder].receive(ticket, step)
                share.sent[number] = (holder, pairs, None, sent_at)  # claimed
                result = decode(reply.partial, self.dtype, hidden.shape[1])
                self._notify(self.workers[holder].node, count, time.perf_counter() - sent_at)
            else:
                result = self._on_head(holder, layer, hidden, share, pairs)
                self._notify("head", count, None)
            if holder != share.owner:
                self.state.covered(self.workers[share.owner].node, self._holder_name(holder), count,
                                   fallback=holder == FALLBACK)
            if whole:
                return result
            outputs[pairs] = result
        return sum_pairs(share.pair_rows, outputs, len(share.rows))

    def _cover(self, layer: int, share: _Share) -> list[tuple[int, np.ndarray | None]]:
        """Who computes a lost share: per pair the first up worker holding a replica of its expert, else the
        head's shard, else the head's fallback. One holder takes the whole share as one request."""
        holder = np.full(len(share.experts), FALLBACK, np.int32)
        if self.local is not None:
            holder[self.local.holds(layer, share.experts)] = HEAD_SHARD
        for index in sorted(self._copies, reverse=True):  # the lowest index wins
            held = self._copies[index].get(layer)
            if held is not None and index not in self.down:
                holder[held[share.experts]] = index
        if self.fallback is None and (holder == FALLBACK).any():
            raise SharesLost(layer, sorted(set(share.experts[holder == FALLBACK].tolist())),
                             {node: outage["reason"] for node, outage in self.state.report().items()})
        holders = np.unique(holder)
        if len(holders) == 1:
            return [(int(holders[0]), None)]
        return [(int(h), np.nonzero(holder == h)[0]) for h in holders]

    def _on_head(self, holder: int, layer: int, hidden: np.ndarray, share: _Share, pairs: np.ndarray | None
                 ) -> np.ndarray:
        rows, pair_rows, experts, weights = self._pairs(hidden, share, pairs)
        rows = decode(encode(rows, self.dtype), self.dtype, hidden.shape[1])  # as the wire would round it
        if holder == HEAD_SHARD:
            partial = self.local.forward_pairs(layer, rows, pair_rows, experts, weights)
        else:
            partial = self.fallback.forward_pairs(share.owner, layer, np.nonzero(self.owners[layer] == share.owner)[0],
                                                  rows, pair_rows, experts, weights)
        return decode(encode(partial, self.dtype), self.dtype, hidden.shape[1])

    @staticmethod
    def _pairs(hidden: np.ndarray, share: _Share, pairs: np.ndarray | None):
        """(hidden rows, pair rows, experts, weights) of the whole share, or of some of its pairs one row each."""
        if pairs is None:
            return hidden[share.rows], share.pair_rows, share.experts, share.weights
        return (hidden[share.rows[share.pair_rows[pairs]]], np.arange(len(pairs), dtype=np.int32),
                share.experts[pairs], share.weights[pairs])

    def _request(self, layer: int, step: int, hidden: np.ndarray, share: _Share, pairs: np.ndarray | None
                 ) -> expert_pb2.ForwardRequest:
        rows, pair_rows, experts, weights = self._pairs(hidden, share, pairs)
        return expert_pb2.ForwardRequest(
            layer=layer, step=step, num_rows=len(rows), dtype=self.dtype, hidden=encode(rows, self.dtype),
            pair_rows=pair_rows.tobytes(), pair_experts=experts.tobytes(), pair_weights=weights.tobytes())

    def _holder_name(self, holder: int) -> str:
        return {HEAD_SHARD: "head", FALLBACK: "head (from its file)"}.get(holder) or self.workers[holder].node

    def _notify(self, node: str, pairs: int, round_trip_s: float | None) -> None:
        for observer in self.observers:
            observer(node, pairs, round_trip_s)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
