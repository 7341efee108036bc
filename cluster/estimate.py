"""What speed a placement will give, before anything loads: a cost model over each machine's measured
figures (`kimi-cluster probe`) and the model's bytes per token.

A decode step reads every head weight once (attention, router, shared experts, output) and, per MoE layer,
the routed experts its tokens picked, each on the node that holds it; nodes compute their shares at once,
but nodes on one machine share its cores. Each layer also pays the runtime's fixed cost, and each worker
a round trip. Prefill is the same walk with 512-row matmuls, bound by arithmetic instead of memory.
Routing is taken as uniform (a node's share of a layer's experts is its share of that layer's work).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from cluster.placement import Placement
from runtime.config import ModelConfig
from runtime.gguf_file import GGUFModelFile

PREFILL_ROWS = 512
SAMPLING_S = 0.0006  # Kimi's settings over 163,840 logits (bench_sampling)
WIRE_BYTES_PER_VALUE = 4  # hidden states travel as float32 both ways


@dataclass(frozen=True)
class MachineSpeed:
    """One machine's figures, as `kimi-cluster probe` measures them; the cluster config can hold them per node."""
    read_gbps: dict[str, float]  # ggml type -> GB/s of weights a one-row matmul streams (all cores)
    thread_read_gbps: dict[str, float]  # the same on one thread (a worker sharing the machine has one or two)
    gflops: dict[str, float]  # ggml type -> GFLOP/s of 512-row matmuls (all cores)
    layer_ms: float  # the runtime's fixed cost per layer and step, in one process
    remote_layer_ms: float  # more per MoE layer and step for a worker (its fixed cost and a loopback round trip)
    next_worker_ms: float  # more again for each further worker on the head's machine, sharing its cores
    cores: int

    def to_dict(self) -> dict:
        """Rounded to 3 significant digits: more would be noise."""
        def rounded(value: float) -> float:
            return float(f"{value:.3g}")
        return {"read_gbps": {k: rounded(v) for k, v in self.read_gbps.items()},
                "thread_read_gbps": {k: rounded(v) for k, v in self.thread_read_gbps.items()},
                "gflops": {k: rounded(v) for k, v in self.gflops.items()}, "layer_ms": rounded(self.layer_ms),
                "remote_layer_ms": rounded(self.remote_layer_ms), "next_worker_ms": rounded(self.next_worker_ms),
                "cores": self.cores}

    @classmethod
    def from_dict(cls, data: Mapping) -> MachineSpeed:
        return cls({str(k): float(v) for k, v in data["read_gbps"].items()},
                   {str(k): float(v) for k, v in data["thread_read_gbps"].items()},
                   {str(k): float(v) for k, v in data["gflops"].items()}, float(data["layer_ms"]),
                   float(data["remote_layer_ms"]), float(data["next_worker_ms"]), int(data["cores"]))


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
    attention_flops_per_pair: int  # per (query, key) pair and layer: MLA scores and values

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
        return cls(head_bytes, expert_bytes, head_params, expert_params, config.num_layers, config.num_experts,
                   config.num_experts_used, config.n_embd, 2 * config.num_heads * (width + values))


@dataclass(frozen=True)
class Estimate:
    decode_tps: float  # one stream
    streams: int
    streams_tps: float  # all streams together
    prefill_tps: float
    parts_ms: dict[str, float] = field(default_factory=dict)  # one stream's step, by part

    @property
    def bottleneck(self) -> str:
        return max(self.parts_ms, key=self.parts_ms.get)

    def format(self) -> str:
        step = sum(self.parts_ms.values())
        parts = ", ".join(f"{name} {ms:.1f} ms ({100 * ms / step:.0f}%)" for name, ms in
                          sorted(self.parts_ms.items(), key=lambda kv: -kv[1]))
        return (f"estimated decode: {self.decode_tps:.2f} tokens/s for one stream, {self.streams_tps:.2f} tokens/s "
                f"over {self.streams} streams; prefill: {self.prefill_tps:.1f} tokens/s\n"
                f"one stream's step, {step:.1f} ms: {parts}\nbottleneck: {self.bottleneck}")


def estimate(cost: ModelCost, placement: Placement, nodes: Mapping[str, NodeSpeed], streams: int = 16) -> Estimate:
    """Decode tokens/s for one stream and for `streams`, and prefill tokens/s, of `placement` on `nodes`."""
    one = _step(cost, placement, nodes, rows=1, distinct_fraction=cost.experts_used / cost.num_experts)
    touched = 1 - (1 - cost.experts_used / cost.num_experts) ** streams  # of a layer's experts, in a step
    many = _step(cost, placement, nodes, rows=streams, distinct_fraction=touched)
    prefill = _step(cost, placement, nodes, rows=PREFILL_ROWS, distinct_fraction=1.0)
    return Estimate(1000 / sum(one.values()), streams, 1000 * streams / sum(many.values()),
                    1000 * PREFILL_ROWS / sum(prefill.values()), one)


def _step(cost: ModelCost, placement: Placement, nodes: Mapping[str, NodeSpeed], rows: int,
          distinct_fraction: float) -> dict[str, float]:
    """Milliseconds of one step of `rows` tokens, by part. Each weight costs the longer of reading it and
    computing its rows; a layer's experts finish when the busiest machine does."""
    head = nodes[placement.head_node]

    def seconds(node: NodeSpeed, nbytes: Mapping[str, int], params: Mapping[str, int], share: float,
                pairs: float) -> float:
        """One node's time for `share` of weights of these sizes, with `pairs` rows through them."""
        speed, fraction = node.speed, node.threads / node.speed.cores
        read = {t: min(speed.read_gbps[t], speed.thread_read_gbps[t] * node.threads) for t in nbytes}
        return sum(max(share * nbytes[t] / (read[t] * 1e9),
                       2 * params[t] * pairs / (speed.gflops[t] * 1e9 * fraction)) for t in nbytes)

    head_math = seconds(head, cost.head_bytes, cost.head_params, 1.0, rows)
    head_math += cost.attention_flops_per_pair * rows * rows / 2 * cost.num_layers / (head.speed.gflops.get("F32", min(
        head.speed.gflops.values())) * 1e9)
    experts = link = round_trips = 0.0
    workers = [name for name in placement.experts if name != placement.head_node]
    for layer, per_expert in cost.expert_bytes.items():
        params = cost.expert_params[layer]
        work: dict[str, float] = {}
        for name, node in nodes.items():
            share = len(placement.experts.get(name, {}).get(layer, ())) / cost.num_experts
            # bytes: the distinct experts the step touches; arithmetic: every (row, expert) pair
            work[name] = seconds(node, per_expert, params, share * distinct_fraction * cost.num_experts,
                                 share * rows * cost.experts_used)
        experts += max(_machine_time(machine, work, nodes, placement.head_node)
                       for machine in {node.machine for node in nodes.values()})
        remote = [nodes[w] for w in workers if placement.experts[w].get(layer)]
        on_head_machine = sum(w.machine == head.machine for w in remote)
        local = on_head_machine and head.speed.remote_layer_ms + (on_head_machine - 1) * head.speed.next_worker_ms
        away = max((w.speed.remote_layer_ms + w.round_trip_ms for w in remote if w.machine != head.machine), default=0)
        round_trips += (local + away) / 1000
        link += max((2 * rows * cost.n_embd * WIRE_BYTES_PER_VALUE / (w.link_gbps * 1e9) for w in remote
                     if w.machine != head.machine), default=0.0)
    return {"head math": 1000 * head_math, "experts": 1000 * experts, "round trips": 1000 * round_trips,
            "link": 1000 * link, "fixed cost per layer": head.speed.layer_ms * cost.num_layers,
            "sampling": 1000 * SAMPLING_S * (rows if rows < PREFILL_ROWS else 1)}


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
