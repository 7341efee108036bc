"""ExpertWorker: the Ray actor that holds one node's share of the routed experts and serves it over gRPC.

The actor is thin: it starts the gRPC server at once, then loads its shard in the background, from its
own copy of the GGUF (mapped, only its experts' pages read) or from the bytes the head streams to it
(cached on its disk). The head polls `progress()` for its progress bars and talks gRPC for the rest.
"""
from __future__ import annotations

import resource
import threading
from pathlib import Path

import ray

from cluster import shard_transfer
from cluster.addresses import LOOPBACK
from cluster.transport import ExpertServicer, serve
from runtime.experts import ExpertShard, ShardSet
from runtime.ggml_backends import ComputeDevice, choose_device
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "kimi-cluster" / "shards"


def rss_bytes() -> int:
    """Resident memory of this process now (file pages it has touched included)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


# Ray restarts a worker whose process dies, for as long as its node lives; the head covers its share
# meanwhile and gives it back once the new process has loaded it (recovery.py). Calls run on threads of
# their own, so progress() answers while add_experts() loads.
@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class ExpertWorker:
    def __init__(self, node: str, owned: dict[int, list[int]], model_path: str | None, port: int, token: str,
                 threads: int | None = None, repack: bool = False, cache_dir: str | None = None,
                 tls: dict[str, str] | None = None, grouped: bool = False, prefetch: bool = True,
                 on_head_machine: bool = False, gpu: str | int = "auto", on_device: dict | None = None):
        """prefetch: read every page of the experts at load, so that the first tokens do not wait on the
        disk (False when they exceed the node's memory: reading them all would only evict the first).
        on_head_machine: every worker runs beside the head (--workers, demo), which reaches it on loopback.
        gpu, on_device: the GPU (as --gpu names one) that copies of these experts (layer -> ids) go on, and
        which it then computes."""
        self.rss_at_start = rss_bytes()
        self.prefetch = prefetch
        self.node, self.owned, self.repack = node, {int(k): v for k, v in owned.items()}, repack
        self.grouped = grouped  # see ExpertShard.grouped
        self.runner = GgmlRunner(threads)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        self.shard: ExpertShard | ShardSet | None = None
        self._shard_lock = threading.Lock()
        self.loaded_bytes, self.total_bytes, self.error = 0, 0, ""
        self.gpu, self.on_device = gpu, {int(k): v for k, v in (on_device or {}).items()}
        self.device_bytes = 0  # of expert copies on the GPU
        servicer = ExpertServicer(node, lambda: self.shard, self._receive, self._health)
        # Listen only where the head reaches this worker: loopback beside the head, else the node's own address
        # (the one Ray and the head use), never every interface.
        self.host = LOOPBACK if on_head_machine else ray.util.get_node_ip_address()
        self.server, self.port = serve(servicer, port, token, tls, host=self.host)
        if model_path is not None:
            threading.Thread(target=self._load_from_file, args=(model_path,), daemon=True).start()

    def _count(self, nbytes: int) -> None:
        self.loaded_bytes += nbytes

    def _load_from_file(self, model_path: str) -> None:
        try:
            model_file = GGUFModelFile(model_path)
            self.total_bytes = model_file.routed_expert_bytes(self.owned)
            shard = ExpertShard.from_model_file(model_file, self.runner, self.owned, self.repack, self._count)
            if self.prefetch:
                shard.touch(self._count)
            else:
                shard.read_on_demand(model_file)
            shard.grouped = self.grouped
            self._hold(self._with_gpu_copies(model_file, shard))
        except Exception as e:  # reported to the head through progress(), which names this node
            self.error = f"{type(e).__name__}: {e}"

    def _with_gpu_copies(self, model_file: GGUFModelFile, shard: ExpertShard) -> ExpertShard | ShardSet:
        """The shard, with copies of the on_device experts on this machine's GPU first, which then computes them."""
        if not self.on_device:
            return shard
        info, line = choose_device(self.gpu, 0)
        if info is None:
            raise RuntimeError(f"gpu_experts_gb is set for {self.node}, but {line.split('; ', 1)[-1]}")
        on_gpu = ExpertShard.from_model_file(model_file, self.runner, self.on_device, device=ComputeDevice(info))
        self.device_bytes = on_gpu.nbytes
        return ShardSet([on_gpu, shard])

    def _receive(self, chunks) -> int:
        """LoadShard: the head streams this node's experts; write, verify, map."""
        def expect(manifest: dict) -> None:
            self.total_bytes = manifest["total_bytes"]
        path, manifest = shard_transfer.receive_shard(chunks, self.cache_dir, self._count, expect)
        shard = shard_transfer.load_shard(path, manifest, self.runner, self.repack)
        shard.grouped = self.grouped
        self._hold(shard)
        return manifest["total_bytes"]

    def _hold(self, shard: ExpertShard) -> None:
        """Serve these experts too (the first shard, or a lost worker's experts taken over later)."""
        with self._shard_lock:
            self.shard = ShardSet.combine(self.shard, shard)

    def add_experts(self, owned: dict[int, list[int]], model_path: str) -> int:
        """Load more experts from this node's copy of the file and serve them too (taking over a lost
        worker's share); returns their bytes once they are served. Nodes without a copy get them from the
        head through LoadShard instead."""
        model_file = GGUFModelFile(model_path)
        shard = ExpertShard.from_model_file(model_file, self.runner, {int(k): v for k, v in owned.items()}, self.repack)
        if self.prefetch:
            shard.touch()
        else:
            shard.read_on_demand(model_file)
        shard.grouped = self.grouped
        self._hold(shard)
        return shard.nbytes

    def _health(self) -> dict:
        return {"ready": self.shard is not None, "shard_bytes": self.total_bytes, "loaded_bytes": self.loaded_bytes,
                "rss_bytes": rss_bytes()}

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def progress(self) -> dict:
        return {**self._health(), "error": self.error, "rss_at_start": self.rss_at_start, "gpu_bytes": self.device_bytes}
