"""Expert workers' gRPC side in the test process (real servers on real sockets), with the routing helpers
the transport and failover tests share."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cluster import shard_transfer
from cluster.transport import ExpertServicer, WorkerClient, serve
from runtime.experts import ExpertShard
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile

TOKEN = "secret-token"


class Worker:
    """An expert worker's gRPC side in this process, serving a fixed shard."""

    def __init__(self, node: str, shard: ExpertShard | None, token: str = TOKEN, tls: dict | None = None):
        self.shard = shard
        self.servicer = ExpertServicer(node, lambda: self.shard, self._receive, lambda: {"ready": True})
        self.server, self.port = serve(self.servicer, 0, token, tls)
        self.received = None
        self.clients: list[WorkerClient] = []

    def _receive(self, chunks):
        path, manifest = shard_transfer.receive_shard(chunks, self.cache_dir)
        self.shard = shard_transfer.load_shard(path, manifest, GgmlRunner(1))
        return manifest["total_bytes"]

    def client(self, token: str = TOKEN, deadline_s: float = 5.0, tls: dict | None = None) -> WorkerClient:
        self.clients.append(WorkerClient(self.servicer.node, f"127.0.0.1:{self.port}", token, deadline_s, tls))
        return self.clients[-1]


@pytest.fixture
def start_worker():
    """Starts in-process workers and stops their servers and closes their clients after the test (an open stream
    would otherwise keep a server thread, and so the test process, alive; a client keeps a channel and a
    watchdog thread)."""
    started = []

    def start(node: str, shard: ExpertShard | None, tls: dict | None = None) -> Worker:
        started.append(Worker(node, shard, tls=tls))
        return started[-1]
    yield start
    for worker in started:
        for client in worker.clients:
            client.close()
        worker.server.stop(grace=None)


@pytest.fixture(scope="module")
def model_file(make_tiny):
    return GGUFModelFile(make_tiny("Q4_K_M"))


def routing(num_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((num_tokens, 256), dtype=np.float32)
    ids = np.stack([rng.permutation(16)[:4] for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.random((num_tokens, 4), dtype=np.float32)
    return hidden, ids, weights


def split_owners(layers, assignment: dict[int, list[int]]) -> dict[int, np.ndarray]:
    owner = np.full(16, -1, np.int32)
    for worker, experts in assignment.items():
        owner[experts] = worker
    return {layer: owner for layer in layers}




class SlowShard:
    """A real shard that takes `delay_s` longer per request, as a big prefill on a slow machine does."""

    def __init__(self, shard: ExpertShard, delay_s: float):
        self.shard, self.delay_s = shard, delay_s

    def forward_pairs(self, *args):
        time.sleep(self.delay_s)
        return self.shard.forward_pairs(*args)
