"""What speed a placement will give, before anything loads: a cost model over each machine's measured
figures (`kimi-cluster probe`) and the model's bytes per token.

A step reads every head weight once (attention, router, shared experts, output), on the head's GPU when it has
one that holds them (then crossing to the CPU and back at every MoE layer), and, per MoE layer, the
routed experts its tokens picked, each on the node that holds it; nodes compute their shares at once,
but nodes on one machine share its cores. A weight costs the longer of reading it and computing its rows;
routed experts compute at the rate measured for their own shape (ggml's mul_mat_id, slower per row than a
dense matmul). Attention computes every (query, cached position) pair at the rate measured for the model's
attention shape, a prompt's rows (matmuls) apart from decoding rows (flash attention). Each layer also pays
the runtime's fixed cost, more for each further row and sequence in the step; each worker a round trip per
layer and a cost per expert it computes. A prompt is the same walk with all its rows in one step. Routing is
taken as uniform (a node's share of a layer's experts is its share of that layer's work).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from cluster.placement import Placement
from runtime.config import ModelConfig
from runtime.ggml_backends import COMPUTE_RESERVE_BYTES as GPU_RESERVE_BYTES
from runtime.gguf_file import GGUFModelFile

SAMPLING_S, SAMPLING_VOCAB = 0.0006, 163840  # Kimi's settings over its 163,840 logits (bench_sampling)
DECODE, PROMPT = "decode", "prompt"  # how the runtime attends: decoding rows (flash), a prompt's rows (matmuls)
WIRE_BYTES_PER_VALUE = 4  # hidden states travel as float32 both ways


@dataclass(frozen=True)
class GpuSpeed:
    """A GPU that holds the head's weights (runtime/ggml_backends.py), as `kimi-cluster probe` measures it."""
    name: str
    memory_gib: float
    read_gbps: dict[str, float]  # ggml type -> GB/s of weights a one-row matmul streams
    gflops: dict[str, float]  # ggml type -> GFLOP/s of 512-row matmuls
    attention_gflops: dict[str, float]  # DECODE, PROMPT -> GFLOP/s of attention at the model's shape
    crossing_ms: float  # one step's hidden row to the CPU and back: where a step crosses to the routed experts
    transfer_gbps: float  # GB/s of larger copies between the GPU and host memory (a prompt's rows)

    def holds(self, cost: ModelCost) -> bool:
        """Whether the head's weights fit, with room for the step's buffers (the runtime's reserve)."""
        return sum(cost.head_bytes.values()) + GPU_RESERVE_BYTES <= self.memory_gib * 2**30

    def to_dict(self) -> dict:
        return {"name": self.name, "memory_gib": _rounded(self.memory_gib),
                "read_gbps": {k: _rounded(v) for k, v in self.read_gbps.items()},
                "gflops": {k: _rounded(v) for k, v in self.gflops.items()},
                "attention_gflops": {k: _rounded(v) for k, v in self.attention_gflops.items()},
                "crossing_ms": _rounded(self.crossing_ms), "transfer_gbps": _rounded(self.transfer_gbps)}

    @classmethod
    def from_dict(cls, data: Mapping) -> GpuSpeed:
        return cls(str(data["name"]), float(data["memory_gib"]),
                   {str(k): float(v) for k, v in data["read_gbps"].items()},
                   {str(k): float(v) for k, v in data["gflops"].items()},
                   {str(k): float(v) for k, v in data["attention_gflops"].items()}, float(data["crossing_ms"]),
                   float(data["transfer_gbps"]))


def _rounded(value: float) -> float:
    """3 significant digits: more would be noise."""
    return float(f"{value:.3g}")


@dataclass(frozen=True)
class MachineSpeed:
    """One machine's figures, as `kimi-cluster probe` measures them; the cluster config can hold them per node."""
    read_gbps: dict[str, float]  # ggml type -> GB/s of weights a one-row matmul streams (all cores)
    thread_read_gbps: dict[str, float]  # the same on one thread (a worker sharing the machine has one or two)
    gflops: dict[str, float]  # ggml type -> GFLOP/s of 512-row matmuls (all cores)
    expert_gflops: dict[int, float]  # (row, expert) pairs per expert -> GFLOP/s of routed experts (all cores)
    expert_shape: str  # the expert shape and types expert_gflops was measured on (ModelCost.expert_shape)
    attention_gflops: dict[str, float]  # DECODE, PROMPT -> GFLOP/s of attention as the runtime computes it there
    attention_shape: str  # the attention shape attention_gflops was measured on (ModelCost.attention_shape)
    layer_ms: float  # the runtime's fixed cost per layer and step, in one process
    row_layer_us: float  # more per layer for each further row of a sequence in the step
    sequence_layer_ms: float  # more per layer and step for each further sequence in the step
    remote_layer_ms: float  # more per MoE layer and step for a worker (its fixed cost and a loopback round trip)
    remote_expert_us: float  # more per expert of a layer a worker computes in a step
    next_worker_ms: float  # more again for each further worker on the head's machine, sharing its cores
    cores: int
    gpu: GpuSpeed | None = None  # the GPU the head's weights go on, if it has one

    def expert_rate(self, pairs_per_expert: float) -> float:
        """GFLOP/s of routed experts at this many pairs per expert: between the measured points, linear in
        the logarithm of the pairs; outside them, the nearest."""
        points = sorted(self.expert_gflops.items())
        return float(np.interp(np.log(max(pairs_per_expert, 1e-9)), [np.log(p) for p, _ in points],
                               [rate for _, rate in points]))

    def to_dict(self) -> dict:
        """Rounded to 3 significant digits: more would be noise."""
        rounded = _rounded
        return {"read_gbps": {k: rounded(v) for k, v in self.read_gbps.items()},
                "thread_read_gbps": {k: rounded(v) for k, v in self.thread_read_gbps.items()},
                "gflops": {k: rounded(v) for k, v in self.gflops.items()},
                "expert_gflops": {k: rounded(v) for k, v in self.expert_gflops.items()},
                "expert_shape": self.expert_shape,
                "attention_gflops": {k: rounded(v) for k, v in self.attention_gflops.items()},
                "attention_shape": self.attention_shape, "layer_ms": rounded(self.layer_ms),
                "row_layer_us": rounded(self.row_layer_us),
                "sequence_layer_ms": rounded(self.sequence_layer_ms), "remote_layer_ms": rounded(self.remote_layer_ms),
                "remote_expert_us": rounded(self.remote_expert_us), "next_worker_ms": rounded(self.next_worker_ms),
                "cores": self.cores, **({"gpu": self.gpu.to_dict()} if self.gpu is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping) -> MachineSpeed:
        return cls({str(k): float(v) for k, v in data["read_gbps"].items()},
                   {str(k): float(v) for k, v in data["thread_read_gbps"].items()},
                   {str(k): float(v) for k, v in data["gflops"].items()},
                   {int(k): float(v) for k, v in data["expert_gflops"].items()}, str(data["expert_shape"]),
                   {str(k): float(v) for k, v in data["attention_gflops"].items()}, str(data["attention_shape"]),
                   float(data["layer_ms"]), float(data["row_layer_us"]), float(data["sequence_layer_ms"]),
                   float(data["remote_layer_ms"]), float(data["remote_expert_us"]), float(data["next_worker_ms"]),
                   int(data["cores"]), GpuSpeed.from_dict(data["gpu"]) if "gpu" in data else None)


@dataclass(frozen=True)
class NodeSpeed:
    """A node of the placement: its machine (nodes on one machine share its cores), how many threads it
    computes with, and its link to the head."""
    machine: str
    speed: MachineSpeed
    threads: int
    round_trip_ms: float = 0.0  # the link's, beyond loopback (0 for a node on the head's machine)
    link_gbps: float = 1.25  # bytes per second / 1e9 (10 GbE)


@dataclass(frozen=True)
class ModelCost:
    """Bytes and multiply-adds per token, by ggml type, from a GGUF's tensor index (no data read)."""
    head_bytes: dict[str, int]  # every non-expert weight a step reads (not the embeddings: a row each)
    expert_bytes: dict[int, dict[str, int]]  # MoE layer -> one expert's bytes by type
    head_params: dict[str, int]
    expert_params: dict[int, dict[str, int]]
    num_layers: int
    num_experts: int
    experts_used: int
    n_embd: int
    attention_dims: tuple[int, int, int]  # query heads, key width, value width (MLA: one shared key head)
    vocab_size: int
    expert_matrices: dict[str, tuple[str, int, int]]  # kind (gate, up, down) -> (type, in, out) of one expert

    @property
    def attention_flops_per_pair(self) -> int:
        """Per (query, cached position) pair and layer: scores and values, every head."""
        heads, width, values = self.attention_dims
        return 2 * heads * (width + values)

    @property
    def attention_shape(self) -> str:
        """e.g. '64 heads, keys 576, values 512': what the probe measures attention on."""
        return "{} heads, keys {}, values {}".format(*self.attention_dims)

    @property
    def expert_shape(self) -> str:
        """e.g. 'gate Q2_K 7168x2048, up Q2_K 7168x2048, down Q2_K 2048x7168': what the probe measures."""
        return ", ".join(f"{kind} {kind_type} {rows}x{cols}" for kind, (kind_type, rows, cols) in
                         self.expert_matrices.items())

    @classmethod
    def from_model(cls, model_file: GGUFModelFile, config: ModelConfig) -> ModelCost:
        head_bytes: dict[str, int] = {}
        head_params: dict[str, int] = {}
        for name, info in model_file.tensors.items():
            if "_exps." in name or name == "token_embd.weight" or len(info.ne) == 1:
                continue
            head_bytes[info.ggml_type.name] = head_bytes.get(info.ggml_type.name, 0) + info.nbytes
            head_params[info.ggml_type.name] = head_params.get(info.ggml_type.name, 0) + int(np.prod(info.ne))
        expert_bytes: dict[int, dict[str, int]] = {}
        expert_params: dict[int, dict[str, int]] = {}
        for layer in config.moe_layers:
            expert_bytes[layer], expert_params[layer] = {}, {}
            for kind in model_file.expert_kinds(layer):
                info = model_file.info(f"blk.{layer}.ffn_{kind}_exps.weight")
                kind_type = info.ggml_type.name
                expert_bytes[layer][kind_type] = expert_bytes[layer].get(kind_type, 0) + info.nbytes // info.ne[-1]
                expert_params[layer][kind_type] = (expert_params[layer].get(kind_type, 0)
                                                   + int(np.prod(info.ne[:-1])))
        width = config.kv_lora_rank + config.rope_dim if config.is_mla else config.head_dim_qk
        values = config.kv_lora_rank if config.is_mla else config.head_dim_v
        first = config.moe_layers[0]
        matrices = {kind: (info.ggml_type.name, info.ne[0], info.ne[1]) for kind in model_file.expert_kinds(first)
                    for info in [model_file.info(f"blk.{first}.ffn_{kind}_exps.weight")]}
        return cls(head_bytes, expert_bytes, head_params, expert_params, config.num_layers, config.num_experts,
                   config.num_experts_used, config.n_embd, (config.num_heads, width, values), config.vocab_size,
                   matrices)


@dataclass(frozen=True)
class Estimate:
    decode_tps: float  # one stream
    streams: int
    streams_tps: float  # all streams together
    prefill_tps: float
    prompt: int  # the prompt length prefill_tps is for
    context: int  # the context length decode is estimated at
    parts_ms: dict[str, float] = field(default_factory=dict)  # one stream's step, by part

    @property
    def bottleneck(self) -> str:
        return max(self.parts_ms, key=self.parts_ms.get)

    def format(self) -> str:
        step = sum(self.parts_ms.values())
        parts = ", ".join(f"{name} {ms:.1f} ms ({100 * ms / step:.0f}%)" for name, ms in
                          sorted(self.parts_ms.items(), key=lambda kv: -kv[1]))
        return (f"estimated decode at {self.context} tokens of context: {self.decode_tps:.2f} tokens/s for one "
                f"stream, {self.streams_tps:.2f} tokens/s over {self.streams} streams; prefill of a "
                f"{self.prompt}-token prompt: {self.prefill_tps:.1f} tokens/s\none stream's step, {step:.1f} ms: "
                f"{parts}\n"
                f"bottleneck: {self.bottleneck}")


def estimate(cost: ModelCost, placement: Placement, nodes: Mapping[str, NodeSpeed], streams: int = 16,
             prompt: int = 512, context: int = 1024) -> Estimate:
    """Decode tokens/s at `context` tokens of context for one stream and for `streams` together, and prefill
    tokens/s of a `prompt`-token prompt (one step), of `placement` on `nodes`."""
    def step(rows: int, sequences: int, positions: int) -> dict[str, float]:
        return step_parts(cost, placement, nodes, rows, sequences, positions)
    one, many, prefill = step(1, 1, context), step(streams, streams, context), step(prompt, 1, prompt)
    return Estimate(1000 / sum(one.values()), streams, 1000 * streams / sum(many.values()),
                    1000 * prompt / sum(prefill.values()), prompt, context, one)


def model_types(cost: ModelCost) -> set[str]:
    """The ggml types a step of the model multiplies by: its weights', and F32 and F16 (norms, the KV cache)."""
    return set(cost.head_bytes) | {t for per_type in cost.expert_bytes.values() for t in per_type} | {"F32", "F16"}


def gpu_use(cost: ModelCost, gpu: GpuSpeed | None) -> str | None:
    """What the head's GPU holds, in a line for `plan`, if the head has one."""
    if gpu is None:
        return None
    head = sum(cost.head_bytes.values()) / 2**30
    if not gpu.holds(cost):
        return (f"the head's GPU, {gpu.name} with {gpu.memory_gib:.1f} GiB, lacks room for its weights ({head:.1f} "
                f"GiB and {GPU_RESERVE_BYTES / 2**30:.0f} GiB for buffers): they stay in RAM")
    left = gpu.memory_gib - head - GPU_RESERVE_BYTES / 2**30
    return (f"the head's GPU, {gpu.name} with {gpu.memory_gib:.1f} GiB: its weights take {head:.1f} GiB, buffers "
            f"{GPU_RESERVE_BYTES / 2**30:.0f} GiB, and KV caches go there while the {left:.1f} GiB left holds them")


def head_types(cost: ModelCost) -> set[str]:
    """The ggml types of the weights a GPU holds for the head, and F32 and F16 (norms, the KV cache)."""
    return set(cost.head_bytes) | {"F32", "F16"}


def check_probed_for(speed: MachineSpeed, cost: ModelCost, node: str) -> None:
    """Refuse figures probed for another model: other weight types, or experts or attention of another shape."""
    missing = sorted(model_types(cost) - set(speed.read_gbps))
    missing_on_gpu = speed.gpu and sorted(head_types(cost) - set(speed.gpu.read_gbps))
    if missing or missing_on_gpu:
        what = f"no figures for {', '.join(missing or missing_on_gpu)}" + (" on its GPU" if not missing else "")
    elif speed.expert_shape != cost.expert_shape:
        what = f"experts of shape {speed.expert_shape}; this model's: {cost.expert_shape}"
    elif speed.attention_shape != cost.attention_shape:
        what = f"attention of {speed.attention_shape}; this model's: {cost.attention_shape}"
    else:
        return
    raise ValueError(f"the speed figures of node '{node}' were probed for another model ({what}): run `kimi-cluster "
                     "probe MODEL` on that machine with this model and paste what it prints under the node")


def expert_gbps(speed: MachineSpeed, cost: ModelCost) -> float:
    """GB of routed experts a machine gets through per second in one stream's decode, on every core: how
    `plan` weighs a node's share of each layer."""
    flops = 2 * sum(n_in * n_out for _, n_in, n_out in cost.expert_matrices.values())
    per_type = next(iter(cost.expert_bytes.values()))
    seconds = max(sum(nbytes / (speed.read_gbps[t] * 1e9) for t, nbytes in per_type.items()),
                  flops / (speed.expert_rate(1) * 1e9))
    return sum(per_type.values()) / seconds / 1e9


def touched_fraction(cost: ModelCost, rows: int) -> float:
    """The fraction of a layer's experts that a step of `rows` rows uses (routing taken as uniform)."""
    return 1 - (1 - cost.experts_used / cost.num_experts) ** rows


def single_node(cost: ModelCost, name: str = "here") -> Placement:
    """Every expert on one node: one process."""
    experts = {layer: tuple(range(cost.num_experts)) for layer in cost.expert_bytes}
    return Placement({name: experts}, {name: 0}, {name: 0}, False, name)


def step_parts(cost: ModelCost, placement: Placement, nodes: Mapping[str, NodeSpeed], rows: int, sequences: int,
               positions: int) -> dict[str, float]:
    """Milliseconds of one step of `rows` tokens in `sequences` sequences, each row attending to `positions`
    cached positions, by part. A layer's experts finish when the busiest machine does."""
    head = nodes[placement.head_node]
    touched = touched_fraction(cost, rows)
    pairs_per_expert = rows * cost.experts_used / (cost.num_experts * touched)
    flops_per_pair = 2 * sum(n_in * n_out for _, n_in, n_out in cost.expert_matrices.values())

    def read_seconds(node: NodeSpeed, nbytes: Mapping[str, int], share: float) -> float:
        speed = node.speed
        return sum(share * nbytes[t] / (min(speed.read_gbps[t], speed.thread_read_gbps[t] * node.threads) * 1e9)
                   for t in nbytes)

    def share_of_cores(node: NodeSpeed) -> float:
        return node.threads / node.speed.cores

    gpu = head.speed.gpu if head.speed.gpu is not None and head.speed.gpu.holds(cost) else None
    if gpu is None:
        head_math = sum(max(read_seconds(head, {t: nbytes}, 1.0),
                            2 * cost.head_params[t] * rows / (head.speed.gflops[t] * 1e9))
                        for t, nbytes in cost.head_bytes.items())
    else:  # the head's weights on its GPU; a step crosses to the CPU's routed experts and back at every MoE layer
        head_math = sum(max(nbytes / (gpu.read_gbps[t] * 1e9), 2 * cost.head_params[t] * rows / (gpu.gflops[t] * 1e9))
                        for t, nbytes in cost.head_bytes.items())
    # Every (row, cached position) pair: a prompt's rows with matmuls (the masked pairs too), decoding rows with
    # flash attention, each at its measured rate
    attention_rate = (gpu or head.speed).attention_gflops[PROMPT if rows > sequences else DECODE]
    head_math += cost.attention_flops_per_pair * rows * positions * cost.num_layers / (attention_rate * 1e9)
    experts = link = worker_overhead = 0.0
    workers = [name for name in placement.experts if name != placement.head_node]
    for layer, per_expert in cost.expert_bytes.items():
        work: dict[str, float] = {}
        for name, node in nodes.items():
            share = len(placement.experts.get(name, {}).get(layer, ())) / cost.num_experts
            compute = (share * rows * cost.experts_used * flops_per_pair
                       / (node.speed.expert_rate(pairs_per_expert) * 1e9 * share_of_cores(node)))
            work[name] = max(read_seconds(node, per_expert, share * touched * cost.num_experts), compute)
        experts += max(_machine_time(machine, work, nodes, placement.head_node)
                       for machine in {node.machine for node in nodes.values()})
        remote = [nodes[w] for w in workers if placement.experts[w].get(layer)]
        on_head_machine = sum(w.machine == head.machine for w in remote)
        local = on_head_machine and head.speed.remote_layer_ms + (on_head_machine - 1) * head.speed.next_worker_ms
        away = max((w.speed.remote_layer_ms + w.round_trip_ms for w in remote if w.machine != head.machine), default=0)
        remote_experts = touched * sum(len(placement.experts[w].get(layer, ())) for w in workers)
        worker_overhead += (local + away) / 1000 + remote_experts * head.speed.remote_expert_us / 1e6
        link += max((2 * rows * cost.n_embd * WIRE_BYTES_PER_VALUE / (w.link_gbps * 1e9) for w in remote
                     if w.machine != head.machine), default=0.0)
    speed = head.speed
    fixed_ms = cost.num_layers * (speed.layer_ms + (rows - 1) * speed.row_layer_us / 1000
                                  + (sequences - 1) * speed.sequence_layer_ms)
    sampling_ms = 1000 * SAMPLING_S * sequences * cost.vocab_size / SAMPLING_VOCAB
    parts = {"head math": 1000 * head_math, "experts": 1000 * experts, "worker overhead": 1000 * worker_overhead,
             "link": 1000 * link, "fixed costs": fixed_ms, "sampling": sampling_ms}
    if gpu is not None:
        copies_ms = 1000 * 2 * rows * cost.n_embd * WIRE_BYTES_PER_VALUE / (gpu.transfer_gbps * 1e9)
        parts["GPU crossings"] = len(cost.expert_bytes) * (gpu.crossing_ms + copies_ms)
    return parts


def _machine_time(machine: str, work: Mapping[str, float], nodes: Mapping[str, NodeSpeed], head: str) -> float:
    """When one machine's nodes finish their shares of a layer (work: seconds at each node's own threads).
    The head computes its share on every core while its local workers wait for cores, then the workers
    run side by side (measured: a local worker's share adds its whole time to the head's). On a machine
    of workers only, they share its cores: together no faster than the machine, none faster than its own
    threads."""
    here = [name for name, node in nodes.items() if node.machine == machine and name != head]
    workers = max((work[name] for name in here), default=0.0)
    if nodes[head].machine == machine:
        return work[head] + workers
    return max(sum(work[name] * nodes[name].threads / nodes[name].speed.cores for name in here), workers)
