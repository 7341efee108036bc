"""Bring-up on the head: connect to Ray, plan the placement, start one ExpertWorker per other node, load
the head's own share, wait for every shard (with progress bars), and wire RemoteExperts into the model.
Workers that die meanwhile, or later, are covered (failover.py) and brought back (recovery.py).

Nodes and budgets come from the cluster config, or from what Ray reports about each live node; with
`local_workers` the workers are extra processes on this machine (for trying things out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from cluster import routing_counts, shard_transfer
from cluster.config import ClusterConfig
from cluster.context_plan import KVPlan, plan_context
from cluster.cost_model.estimate import ModelCost, check_probed_for, expert_gbps
from cluster.failover import FailoverState, HeadFallback
from cluster.placement import GiB, Inventory, NodeBudget, Placement, with_copies
from cluster.recovery import WorkerRecovery
from cluster.security import ray_auth
from cluster.transport import RemoteExperts, WorkerClient, WorkerFailed
from cluster.workers import ExpertWorker
from runtime.config import ModelConfig
from runtime.experts import ExpertShard
from runtime.ggml_backends import ComputeDevice
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import bytes_per_token
from runtime.model import KimiModel

HEAD = "head"
# Ray gives a new node's raylet 30 s to register, which a loaded 2-core machine now and then misses; the next
# start goes through.
LOCAL_RAY_STARTS = 3


class WorkerDied(RuntimeError):
    """A worker's actor died (Ray may be restarting it)."""


@dataclass(frozen=True)
class ClusterNode:
    name: str
    ray_node_id: str
    address: str  # IP as Ray sees it
    budget: NodeBudget


def total_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) * 1024


def _stop_processes_under(folder: str) -> None:
    """Kill what a failed Ray start left running: its processes name their session folder, under `folder`."""
    for process in psutil.process_iter(["cmdline"]):
        if any(folder in argument for argument in process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                process.kill()


def local_budgets(num_workers: int, worker_memory_gb: float | None, head_memory_gb: float | None) -> list[NodeBudget]:
    """The head and `num_workers` worker processes on this machine: 80% of RAM split evenly unless given."""
    even_share = total_memory_bytes() * 0.8 / (num_workers + 1)
    head = int(head_memory_gb * GiB) if head_memory_gb is not None else int(even_share)
    worker = int(worker_memory_gb * GiB) if worker_memory_gb is not None else int(even_share)
    return [NodeBudget(HEAD, head, is_head=True)] + [NodeBudget(f"worker-{i}", worker)
                                                      for i in range(1, num_workers + 1)]


def local_nodes(num_workers: int, worker_memory_gb: float | None, head_memory_gb: float | None) -> list[ClusterNode]:
    node_id, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    return [ClusterNode(b.name, node_id, ip, b) for b in local_budgets(num_workers, worker_memory_gb, head_memory_gb)]


def ray_nodes(config: ClusterConfig) -> list[ClusterNode]:
    """The live Ray nodes, with budgets from the config (matched by address) or from Ray's memory resource."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    driver = ray.get_runtime_context().get_node_id()
    if config.nodes:
        by_address = {n["NodeManagerAddress"]: n for n in alive}
        missing = [n.name for n in config.nodes if n.address not in by_address]
        if missing:
            raise RuntimeError(f"nodes {missing} from {config.source} are not in the Ray cluster (Ray sees "
                               f"{sorted(by_address)}); start Ray on them or fix their addresses")
        here = next(n["NodeManagerAddress"] for n in alive if n["NodeID"] == driver)
        if config.head_node.address != here:
            raise RuntimeError(f"{config.source} makes '{config.head_node.name}' ({config.head_node.address}) the head, "
                               f"but this command runs on {here}: run it on the head, or mark this node "
                               "`head: true`")
        return [ClusterNode(n.name, by_address[n.address]["NodeID"], n.address, budget)
                for n, budget in zip(config.nodes, config.node_budgets())]
    nodes = []
    for n in sorted(alive, key=lambda n: (n["NodeID"] != driver, n["NodeID"])):
        is_head = n["NodeID"] == driver
        name = HEAD if is_head else f"{n['NodeManagerAddress']}/{n['NodeID'][:6]}"
        nodes.append(ClusterNode(name, n["NodeID"], n["NodeManagerAddress"],
                                 NodeBudget(name, int(n["Resources"].get("memory", 0)), is_head)))
    return nodes


def owner_arrays(placement: Placement, worker_names: list[str], num_experts: int) -> dict[int, np.ndarray]:
    """Per MoE layer, which worker (index into worker_names) holds each expert; -1 for the head."""
    index = {name: i for i, name in enumerate(worker_names)}
    owners: dict[int, np.ndarray] = {}
    for node, layers in placement.experts.items():
        for layer, experts in layers.items():
            owner = owners.setdefault(layer, np.full(num_experts, -1, np.int32))
            owner[list(experts)] = index.get(node, -1)
    return owners


class ExpertCluster:
    """A running cluster for one model: `start()` returns a KimiModel whose experts live on the nodes."""

    routing_dir = routing_counts.DEFAULT_DIR  # where routing counts are kept between runs

    def __init__(self, model_path: str | Path, config: ClusterConfig, local_workers: int = 0,
                 worker_memory_gb: float | None = None, head_memory_gb: float | None = None,
                 streamed_nodes: frozenset[str] = frozenset(), repack: str = "head",
                 worker_threads: int | None = None, progress: bool = True, device: ComputeDevice | None = None):
        """device: the compute device that holds the head's own weights (ggml_backends.py), if any."""
        self.model_file = GGUFModelFile(model_path)
        self.model_config = ModelConfig.from_metadata(self.model_file.metadata, str(self.model_file.path))
        if config.model is None:  # nodes find the model where the head does
            config = dataclasses.replace(config, model=Path(model_path))
        self.config, self.local_workers, self.repack, self.progress = config, local_workers, repack, progress
        self.device = device
        self.worker_memory_gb, self.head_memory_gb = worker_memory_gb, head_memory_gb
        self.streamed_nodes, self.worker_threads = streamed_nodes, worker_threads
        self.token = config.token or secrets.token_hex(16)
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.workers: dict[str, ClusterNode] = {}  # expert-holding nodes other than the head, by name
        self.remote: RemoteExperts | None = None  # set once every shard has loaded
        self.placement: Placement | None = None  # set by start(), once planned
        self.load_progress: dict[str, float] = {}  # worker -> share of its experts loaded, while start() waits
        self.failover = FailoverState(announce=lambda line: print(f"kimi-cluster: {line}", file=sys.stderr,
                                                                     flush=True))
        self.recovery: WorkerRecovery | None = None
        self.recovery_error = ""  # the last check that went wrong while bringing a worker back
        self._inventory: Inventory | None = None
        self.kv_plan: KVPlan | None = None  # set by plan()
        self.kept_routing: np.ndarray | None = None  # earlier runs' routing counts, read by plan()
        self._started_ray = False
        self._ray_temp_dir: str | None = None
        self._stream_error = ""

    def nodes(self) -> list[ClusterNode]:
        if not ray.is_initialized():
            handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
            for warning in self._start_ray():
                print(f"kimi-cluster: warning: {warning}", file=sys.stderr)
            self._started_ray = True
            if threading.current_thread() is threading.main_thread():
                # Ray's core worker installs a crash handler that dumps stacks on SIGTERM and exits 15;
                # keep the clean shutdown the caller set up.
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        if self.local_workers:
            return local_nodes(self.local_workers, self.worker_memory_gb, self.head_memory_gb)
        return ray_nodes(self.config)

    def _start_ray(self) -> list[str]:
        """Join the config's Ray cluster, or start one of our own; returns what the user should be warned of."""
        address = self.config.ray_address
        if address is not None:
            ray_auth.prepare_remote()
            try:
                context = ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except (ray.exceptions.AuthenticationError, ConnectionError):
                if ":" in address and "://" not in address and ray_auth.refuses_without_token(address):
                    raise RuntimeError(f"the Ray cluster at {address} asks for its token, and this machine has "
                                       "none or another: copy ~/.ray/auth_token from the machine that started it "
                                       "(see the README's \"Security\" section)") from None
                raise
            return ray_auth.exposure_warnings(ray.get_runtime_context().gcs_address, context.dashboard_url)
        # A Ray of our own on this machine: addressed on loopback (its processes still listen on every interface;
        # the token refuses other callers), no dashboard (it and its module
        # processes cost about a GB for nothing here, and its Jobs API would run code), session files in a
        # folder removed at close, callers without the token refused.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        warnings = ray_auth.prepare_local()
        for _ in range(LOCAL_RAY_STARTS):
            self._ray_temp_dir = tempfile.mkdtemp(prefix="kimi-ray-")
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                         _temp_dir=self._ray_temp_dir, logging_level="ERROR", log_to_driver=False)
                return warnings
            except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its node times out
                if "timed out" not in str(e).lower():
                    raise
                failure = e
                ray.shutdown()
                _stop_processes_under(self._ray_temp_dir)
                shutil.rmtree(self._ray_temp_dir, ignore_errors=True)
        raise RuntimeError(f"Ray did not start on this machine, {LOCAL_RAY_STARTS} times: {failure} Is the machine "
                           "short of CPU or memory?")

    def inventory(self) -> Inventory:
        """What must be placed: every expert's bytes, and what the head holds (weights and, once planned, the
        KV cache)."""
        if self._inventory is None:
            self._inventory = Inventory.from_model(self.model_file, self.model_config)
        return self._inventory

    def plan(self, budgets: list[NodeBudget]) -> Placement:
        """Where every expert goes (by the nodes' probed speeds when the config has them all; replicas of the
        most routed first, by the counts of earlier runs), and the context the head's KV cache holds
        (self.kv_plan: the config's, else the largest that fits)."""
        inventory = self.inventory()
        self.kept_routing = heat = routing_counts.load(self.model_file, inventory.expert_bytes.shape, self.routing_dir)
        placement, self.kv_plan = plan_context(
            inventory, self._with_speeds(budgets), bytes_per_token=bytes_per_token(self.model_config),
            max_sequences=self.config.max_sequences, model_context=self.model_config.context_length,
            context=self.config.context, reserve_bytes=self.config.reserve_bytes, allow_disk=self.config.allow_disk,
            replicas=self.config.replicas, heat=heat)
        self._inventory = inventory.with_kv_cache(self.kv_plan.reserved_bytes)
        return placement

    def _with_speeds(self, budgets: list[NodeBudget]) -> list[NodeBudget]:
        """Each budget of a config node with probed figures gets its expert speed for this model."""
        probed = {n.name: n.speed for n in self.config.nodes if n.speed is not None}
        if not probed:
            return budgets
        cost = ModelCost.from_model(self.model_file, self.model_config)
        for name, speed in probed.items():
            check_probed_for(speed, cost, name)
        return [dataclasses.replace(b, expert_gbps=expert_gbps(probed[b.name], cost)) if b.name in probed else b
                for b in budgets]

    def start(self) -> KimiModel:
        nodes = self.nodes()
        self.placement = self.planned = self.plan([n.budget for n in nodes])  # refuses an oversized pool before anything loads
        runner = GgmlRunner(self.config.threads)
        workers = [n for n in nodes if not n.budget.is_head and self.placement.experts.get(n.name)]
        self.workers = {n.name: n for n in workers}
        for node in workers:
            self.actors[node.name] = self._spawn(node)
        head_share = self._load_head_share(runner)
        clients, died = self._wait_for_workers(workers)
        owners = owner_arrays(self.placement, [n.name for n in workers], self.model_config.num_experts)
        fallback = HeadFallback(self.model_file, runner, self._repack_experts, grouped=self.repack == "all")
        replicas = {index: self.placement.replicas[n.name] for index, n in enumerate(workers)
                    if n.name in self.placement.replicas}
        self.remote = RemoteExperts(owners, clients, head_share, self.config.wire_dtype, fallback, replicas,
                                    self.failover)
        for index, client in enumerate(clients):
            if client.node in died:
                self.remote.mark_down(index, WorkerFailed(client.node, died[client.node]))
        self.recovery = WorkerRecovery(self, self.remote)
        model = KimiModel(self.model_file, runner, experts=self.remote,
                          repack="head" if self.repack in ("head", "all") else "none", device=self.device)
        model.load(self.progress)
        return model

    def _model_path_on(self, node: ClusterNode) -> str | None:
        if node.name in self.streamed_nodes:
            return None
        path = self.config.model_path_for(node.name)
        return None if path is None else str(path)

    def _spawn(self, node: ClusterNode):
        owned = {int(layer): list(experts) for layer, experts in self.placement.held(node.name).items()}
        # Workers sharing an address (local ones) each take a free port; others listen on the configured one.
        shared = sum(n.address == node.address for n in self.workers.values()) > 1
        port = 0 if shared else self.config.port
        # Local workers share this machine's cores with the head and each other.
        shared_cores = max(1, len(os.sched_getaffinity(0)) // (self.local_workers + 1)) if self.local_workers else None
        threads = self.worker_threads or self.config.threads or shared_cores
        return ExpertWorker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.ray_node_id, soft=False),
            runtime_env={"env_vars": self._worker_openmp_env()},
        ).remote(node.name, owned, self._model_path_on(node), port, self.token, threads, self._repack_experts,
                 None, self.tls_for(node.name), grouped=self.repack == "all",
                 prefetch=self.placement.in_memory(node.name), on_head_machine=bool(self.local_workers),
                 **self._worker_gpu(node.name, owned))

    def _worker_gpu(self, name: str, owned: dict[int, list[int]]) -> dict:
        """The GPU a config node's worker uses and the experts it copies there: of those it holds, the most routed
        that fit in its gpu_experts_gb (routing_counts.hottest)."""
        node = next((n for n in self.config.nodes if n.name == name), None)
        if node is None or not node.gpu_experts_gb:
            return {}
        held = np.zeros_like(self.inventory().expert_bytes)
        for layer, experts in owned.items():
            held[layer, experts] = self.inventory().expert_bytes[layer, experts]
        return {"gpu": node.gpu, "on_device": routing_counts.hottest(self.kept_routing, held,
                                                                     int(node.gpu_experts_gb * GiB))}

    def _worker_openmp_env(self) -> dict[str, str]:
        """Workers sharing the head's machine (--workers) sleep between ops at once, leaving the cores to the
        head (they inherit its environment, spin count included: it must be reset). Workers on machines of
        their own spin between ops as the head does, but only briefly before they sleep (GOMP_SPINCOUNT):
        without a limit, an idle worker would keep its cores busy."""
        if self.local_workers:
            return {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "0"}
        return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive"),
                "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "300000")}

    @property
    def _repack_experts(self) -> bool:
        # Interleaved copies live in RAM: experts placed to be paged from disk (allow_disk) stay mapped.
        return self.repack in ("experts", "all") and not self.placement.disk_backed

    def _load_head_share(self, runner: GgmlRunner) -> ExpertShard | None:
        owned = self.placement.held(self.placement.head_node)
        if not owned:
            return None
        with tqdm(total=self.model_file.routed_expert_bytes(owned), unit="B", unit_scale=True, desc=f"{'head':>16s}", disable=not self.progress,
                  leave=False) as bar:
            shard = ExpertShard.from_model_file(self.model_file, runner, owned, self._repack_experts, bar.update)
            if self.placement.in_memory(self.placement.head_node):
                shard.touch(bar.update)
            else:  # reading it all would only evict the first of it
                shard.read_on_demand(self.model_file)
        shard.grouped = self.repack == "all"
        return shard

    def respawn(self, name: str) -> bool:
        """A worker whose node left the Ray cluster: start it again once a node with the same address is
        back. While its node lives, Ray restarts the actor itself. True if a new actor was started."""
        node = self.workers[name]
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        if node.ray_node_id in alive:
            return False
        back = next((n for n in alive.values() if n["NodeManagerAddress"] == node.address), None)
        if back is None:
            return False
        ray.kill(self.actors[name])  # no more restarts on the node that is gone
        self.workers[name] = node = ClusterNode(node.name, back["NodeID"], node.address, node.budget)
        self.actors[name] = self._spawn(node)
        return True

    def take_over(self, name: str, per_layer: dict[int, tuple[int, ...]]) -> None:
        """Have worker `name` load these experts (a lost worker's) beside its own, then compute them while
        their worker is down: from its copy of the file, or streamed from the head."""
        owned = {int(layer): list(ids) for layer, ids in per_layer.items()}
        if self.streams_to(name):
            client = self.connect(name)
            try:
                self.stream_shard(client, owned)
            finally:
                client.close()
        else:
            ray.get(self.actors[name].add_experts.remote(owned, str(self._model_path_on(self.workers[name]))))
        index = [client.node for client in self.remote.workers].index(name)
        self.remote.add_copies(index, owned)
        nbytes = {name: self.model_file.routed_expert_bytes(owned)}
        self.placement = with_copies(self.placement, {name: per_layer}, nbytes)

    def forget_copies_of(self, name: str) -> None:
        """A worker that rejoins holds its planned experts and replicas only (copies taken over since were
        lost with its old process, or are dropped with it)."""
        replicas = dict(self.placement.replicas)
        replica_bytes = dict(self.placement.replica_bytes)
        for source, target in ((self.planned.replicas, replicas), (self.planned.replica_bytes, replica_bytes)):
            target.pop(name, None)
            if name in source:
                target[name] = source[name]
        self.placement = dataclasses.replace(self.placement, replicas=replicas, replica_bytes=replica_bytes)

    def connect(self, name: str, address: str | None = None) -> WorkerClient:
        """A Forward stream to worker `name`, at `address` or where its actor says it listens now."""
        address = address or self._get(name, self.actors[name].address.remote())
        return WorkerClient(name, address, self.token, self.config.deadline_s, self.tls_for(self.head_name))

    def streams_to(self, name: str) -> bool:
        """Whether the head sends this node its experts (it has no copy of the file)."""
        return self._model_path_on(self.workers[name]) is None

    @property
    def head_name(self) -> str:
        return self.config.head_node.name if self.config.nodes and not self.local_workers else HEAD

    def tls_for(self, name: str) -> dict[str, str] | None:
        """Node `name`'s TLS files (the head's are its client certificate), checked to exist here."""
        if self.config.tls is None:
            return None
        files = self.config.tls.for_node(name)
        missing = [path for path in files.values() if not os.path.isfile(path)]
        if missing and (name == self.head_name or self.local_workers):  # a worker elsewhere checks its own
            raise RuntimeError(f"node '{name}' has no TLS file {missing[0]}; make its certificate with `kimi-cluster "
                               f"certs DIR --nodes {name}=ADDRESS` (the nodes' names are the ones `plan` shows)")
        return files

    def _wait_for_workers(self, workers: list[ClusterNode]) -> tuple[list[WorkerClient], dict[str, str]]:
        """A client per worker once all have loaded, and the workers that died meanwhile (with why): those
        start down, covered by the others, and are brought back while the cluster serves."""
        died: dict[str, str] = {}
        addresses = {}
        for node in workers:
            try:
                addresses[node.name] = self._get(node.name, self.actors[node.name].address.remote())
            except WorkerDied as e:
                died[node.name], addresses[node.name] = str(e), "unknown"
        clients = [self.connect(n.name, addresses[n.name]) for n in workers]
        streams = [threading.Thread(target=self._stream_at_bring_up, args=(client,), daemon=True)
                   for client in clients if self.streams_to(client.node) and client.node not in died]
        for thread in streams:
            thread.start()
        bars = {n.name: tqdm(total=1, unit="B", unit_scale=True, desc=f"{n.name:>16s}", position=i,
                             disable=not self.progress, leave=False) for i, n in enumerate(workers)}
        pending = set(bars) - set(died)
        while pending:
            for name in sorted(pending):
                try:
                    state = self._get(name, self.actors[name].progress.remote())
                except WorkerDied as e:
                    died[name] = str(e)
                    pending.discard(name)
                    continue
                if state["error"] or self._stream_error:
                    raise RuntimeError(f"the expert worker on node {name} could not load its experts: "
                                       f"{state['error'] or self._stream_error}")
                bars[name].total = max(state["shard_bytes"], 1)
                bars[name].n = state["loaded_bytes"]
                self.load_progress[name] = state["loaded_bytes"] / bars[name].total
                bars[name].refresh()
                if state["ready"]:
                    pending.discard(name)
            time.sleep(0.1)
        for bar in bars.values():
            bar.close()
        return clients, died

    def stream_shard(self, client: WorkerClient, owned: dict[int, list[int]] | None = None) -> None:
        """Send a worker without the file its experts (all it holds, or `owned`)."""
        manifest = shard_transfer.build_manifest(self.model_file, owned or self.placement.held(client.node))
        client.load_shard(shard_transfer.stream_shard(self.model_file, manifest))

    def _stream_at_bring_up(self, client: WorkerClient) -> None:
        try:
            self.stream_shard(client)
        except (WorkerFailed, OSError, ValueError) as e:
            self._stream_error = str(e)

    def _get(self, node: str, ref):
        try:
            return ray.get(ref, timeout=max(60.0, self.config.deadline_s))
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(f"the expert worker on node {node} died while loading: {e}") from None
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the expert worker on node {node} does not answer") from None

    def status(self) -> dict:
        """For /health: each worker's state ("ok" or what is wrong), and per node down: why, for how long,
        who covers its experts and whether it is loading again."""
        down = self.failover.report()
        workers = {}
        for index, client in enumerate(self.remote.workers if self.remote else []):
            if client.node in down:
                covered = ", ".join(down[client.node]["covered_by"]) or "nobody yet"
                workers[client.node] = f"down ({down[client.node]['reason']}); its experts computed by {covered}"
            else:
                workers[client.node] = client.state()
        status = {"workers": workers, "down": down}
        if down and self.recovery_error:
            status["recovery_error"] = self.recovery_error
        return status

    def close(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        if self.remote is not None:
            try:
                routing_counts.add(self.model_file, self.remote.routed, self.routing_dir)
            except OSError as e:  # only a hint for the next plan: say so, and close anyway
                print(f"kimi-cluster: could not keep the routing counts in {self.routing_dir}: {e}", file=sys.stderr)
            self.remote.close()
        for actor in self.actors.values():
            ray.kill(actor)
        if self._started_ray:
            ray.shutdown()
        # Dropped only now: handles that go out of scope while Ray shuts down log an error each.
        self.actors.clear()
        if self._ray_temp_dir is not None:
            shutil.rmtree(self._ray_temp_dir, ignore_errors=True)

    def __enter__(self) -> "ExpertCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
