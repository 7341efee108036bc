"""The README's "What speed to expect" table: `plan --estimate` for Kimi K2.6 UD-Q2_K_XL on a few homelab
setups, from assumed machine figures (not measured; `kimi-cluster probe` measures your own).

    python tests/bench/estimate_homelabs.py [--probe-here]

The memory figures are assumed; the compute figures scale this machine's per-core rates (kept from its last
`kimi-cluster probe`, or measured now with --probe-here) to each machine's cores, and its fixed costs are
kept as measured. Writes the replica (build/k2.6/) if missing: only its header is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cluster.cost_model.estimate import (GpuSpeed, MachineSpeed, ModelCost, NodeSpeed, estimate, expert_gbps,  # noqa: E402
                                         head_types)
from cluster.cost_model.kept_probe import probe_here  # noqa: E402
from cluster.placement import GiB, Inventory, NodeBudget, plan  # noqa: E402
from runtime.config import ModelConfig  # noqa: E402
from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.synthetic.replica_model import NAME, part_paths, write_sparse_replica  # noqa: E402

REPLICA = part_paths(Path(__file__).resolve().parents[2] / "build" / "k2.6" / f"{NAME}.gguf")[0]
# (cores, GB/s streamed on every core, GB/s on one thread): assumed
MACHINES = {"8-core DDR5 desktop": (8, 30.0, 10.0), "6-core DDR4 desktop": (6, 25.0, 8.0),
            "32-core 8-channel server": (32, 100.0, 12.0)}
LINKS = {"10 GbE": (0.15, 1.25), "2.5 GbE": (0.3, 0.31)}  # (round trip ms, GB/s): assumed
# A 24 GiB consumer GPU (RTX 3090 or 4090 class) in the head: GB/s its quantized one-row matmuls stream, GFLOP/s of
# its 512-row matmuls, of attention (decoding rows, a prompt's), ms of a step's crossing to the CPU and back, GB/s
# of PCIe 4.0 x16 copies: assumed (about 75% of its memory's 936-1008 GB/s, as llama.cpp's CUDA kernels reach)
GPU_24GB = (24.0, 700.0, 40000.0, {"decode": 10000.0, "prompt": 40000.0}, 0.03, 20.0)
SETUPS = [("4 x 128 GiB desktops, 10 GbE", [("8-core DDR5 desktop", 128)] * 4, "10 GbE", False),
          ("the same, with a 24 GiB GPU in the head", [("8-core DDR5 desktop", 128)] * 4, "10 GbE", True),
          ("one 512 GiB server + 2 x 64 GiB desktops, 10 GbE",
           [("32-core 8-channel server", 512)] + [("6-core DDR4 desktop", 64)] * 2, "10 GbE", False),
          ("the same, with a 24 GiB GPU in the server",
           [("32-core 8-channel server", 512)] + [("6-core DDR4 desktop", 64)] * 2, "10 GbE", True),
          ("8 x 64 GiB desktops, 2.5 GbE", [("6-core DDR4 desktop", 64)] * 8, "2.5 GbE", False)]


def machine_speed(here: MachineSpeed, cores: int, gbps: float, thread_gbps: float) -> MachineSpeed:
    """A machine streaming `gbps`, computing at this machine's rate per core on `cores` cores."""
    scale = cores / here.cores
    return dataclasses.replace(here, read_gbps={t: gbps for t in here.read_gbps},
                               thread_read_gbps={t: thread_gbps for t in here.read_gbps},
                               gflops={t: rate * scale for t, rate in here.gflops.items()},
                               expert_gflops={p: rate * scale for p, rate in here.expert_gflops.items()}, cores=cores)


def with_gpu(speed: MachineSpeed, cost: ModelCost) -> MachineSpeed:
    memory_gib, gbps, gflops, attention, crossing_ms, transfer_gbps = GPU_24GB
    types = head_types(cost)
    return dataclasses.replace(speed, gpu=GpuSpeed("a 24 GiB GPU", memory_gib, {t: gbps for t in types},
                                                   {t: gflops for t in types}, attention, crossing_ms, transfer_gbps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-here", action="store_true", help="measure this machine now")
    args = parser.parse_args()
    if not REPLICA.exists():
        write_sparse_replica(REPLICA.parent / f"{NAME}.gguf")
    model_file = GGUFModelFile(REPLICA)
    config = ModelConfig.from_metadata(model_file.metadata)
    cost = ModelCost.from_model(model_file, config)
    here = probe_here(cost, fresh=args.probe_here, say=lambda line: print(line, file=sys.stderr)).speed
    inventory = Inventory.from_model(model_file, config, context=4096, max_sequences=8)
    print("| setup | decode, 1 stream | 8 streams | prefill | bottleneck |\n|---|---|---|---|---|")
    for label, machines, link, gpu in SETUPS:
        round_trip, link_gbps = LINKS[link]
        speeds, budgets = {}, []
        for n, (machine, memory_gb) in enumerate(machines):
            speed = machine_speed(here, *MACHINES[machine])
            if gpu and n == 0:
                speed = with_gpu(speed, cost)
            name = f"node{n}"
            speeds[name] = NodeSpeed(name, speed, speed.cores, round_trip if n else 0.0, link_gbps)
            budgets.append(NodeBudget(name, memory_gb * GiB, n == 0, expert_gbps(speed, cost)))
        placement = plan(inventory, budgets)
        result = estimate(cost, placement, speeds, streams=8)
        print(f"| {label} | {result.decode_tps:.1f} tokens/s | {result.streams_tps:.1f} tokens/s | "
              f"{result.prefill_tps:.0f} tokens/s | {result.bottleneck} |")


if __name__ == "__main__":
    main()
