"""The cost model with a GPU in the head (cluster/cost_model): `probe` measures the GPU the head's weights would go
on (here the CPU standing in, through the same device path), the figures travel through the cluster config, and
`plan --estimate` costs the head's weights at the GPU's rates, plus a crossing to the CPU's routed experts and back
at every MoE layer, when they fit in its memory."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from cluster.cli.main import main
from cluster.cost_model import kept_probe
from cluster.cost_model.estimate import (GpuSpeed, MachineSpeed, ModelCost, NodeSpeed, estimate, gpu_use, head_types,
                                         single_node)
from cluster.cost_model.probe import gpu_speeds
from runtime.config import ModelConfig
from runtime.ggml_backends import ComputeDevice, choose_device
from runtime.gguf_file import GGUFModelFile
from tests.test_cli import probed


def model_cost(path) -> ModelCost:
    model_file = GGUFModelFile(path)
    return ModelCost.from_model(model_file, ModelConfig.from_metadata(model_file.metadata))


def gpu(cost: ModelCost, memory_gib: float, gbps: float = 700.0) -> GpuSpeed:
    """A GPU reading every head type at `gbps` GB/s (a 24 GiB consumer card reads about 700)."""
    return GpuSpeed("GPU0 (a test card)", memory_gib, {t: gbps for t in head_types(cost)},
                    {t: 50 * gbps for t in head_types(cost)}, {"decode": 20000.0, "prompt": 50000.0}, 0.03, 20.0)


def test_the_head_on_a_gpu_that_holds_it_decodes_at_the_gpus_speed(replica):
    cost = model_cost(replica)
    cpu = MachineSpeed.from_dict(probed(cost, 30.0))
    placement = single_node(cost, "head")

    def run(speed: MachineSpeed):
        return estimate(cost, placement, {"head": NodeSpeed("box", speed, speed.cores)}, streams=8)
    without = run(cpu)
    with_gpu = run(dataclasses.replace(cpu, gpu=gpu(cost, 24.0)))
    too_small = run(dataclasses.replace(cpu, gpu=gpu(cost, 8.0)))  # K2.6's head weights: 8.5 GiB
    assert with_gpu.parts_ms["head math"] < without.parts_ms["head math"] / 10
    assert with_gpu.decode_tps > without.decode_tps and with_gpu.prefill_tps > without.prefill_tps
    assert with_gpu.parts_ms["GPU crossings"] == pytest.approx(len(cost.expert_bytes) * (0.03 + 1000 * 2 * 7168 * 4
                                                                                          / 20e9), rel=1e-6)
    assert too_small.parts_ms == without.parts_ms and "GPU crossings" not in too_small.parts_ms
    assert "its weights take 8." in gpu_use(cost, gpu(cost, 24.0))
    assert "lacks room" in gpu_use(cost, gpu(cost, 8.0)) and gpu_use(cost, None) is None


def test_gpu_figures_travel_through_the_cluster_config_to_the_plan(make_tiny, tmp_path, capsys):
    path = make_tiny("Q4_K_M")
    cost = model_cost(path)
    speed = {**probed(cost, 10), "gpu": gpu(cost, 24.0).to_dict()}
    assert MachineSpeed.from_dict(yaml.safe_load(yaml.safe_dump(speed))).gpu == gpu(cost, 24.0)
    nodes = [{"name": "atlas", "address": "10.0.0.1", "memory_gb": 8, "head": True, "speed": speed}]
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"model": str(path), "reserve_gb": 0, "nodes": nodes}))
    assert main(["plan", str(path), "--config", str(config), "--estimate"]) in (0, None)
    out = capsys.readouterr().out
    assert "the head's GPU, GPU0 (a test card) with 24.0 GiB: its weights take" in out
    assert re.search(r"GPU crossings [\d.]+ ms", out)


def test_probe_measures_the_gpu_through_the_device_path(make_tiny, tmp_path, monkeypatch):
    """With the CPU standing in: every type of the head's weights read and multiplied in the device's buffers,
    attention over a cache there, and the crossings; kept with the GPU's name, and not taken for a run without."""
    cost = model_cost(make_tiny("Q4_K_M"))
    device = ComputeDevice(choose_device("cpu", 0)[0])
    measured = gpu_speeds(cost, device, tmp_path)
    assert set(measured.read_gbps) == set(measured.gflops) == head_types(cost)
    assert min(measured.read_gbps.values()) > 0 and min(measured.gflops.values()) > 0
    assert min(measured.attention_gflops.values()) > 0 and measured.crossing_ms > 0 and measured.transfer_gbps > 0
    monkeypatch.setattr(kept_probe, "PROBE_CACHE", tmp_path / "kept")
    speed = dataclasses.replace(MachineSpeed.from_dict(probed(cost, 10)), gpu=measured)
    kept_probe.keep(kept_probe.Probed(speed, {"matmul speeds": 1.0}), cost)
    assert kept_probe.kept_speed(cost, device).to_dict() == speed.to_dict()  # as kept: to 3 digits
    assert kept_probe.kept_speed(cost, None) is None  # figures with a GPU are not this run's without one


def test_plan_says_what_each_gpu_would_hold(make_tiny, tmp_path, capsys):
    path = make_tiny("Q4_K_M")
    nodes = [{"name": "atlas", "address": "10.0.0.1", "memory_gb": 8, "head": True},
             {"name": "borealis", "address": "10.0.0.2", "memory_gb": 8, "gpu": 1, "gpu_experts_gb": 20}]
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"model": str(path), "reserve_gb": 0, "nodes": nodes}))
    assert main(["plan", str(path), "--config", str(config), "--gpu", "cpu"]) in (0, None)
    out = capsys.readouterr().out
    assert "GPU here: the head computes through the device scheduler with the CPU standing in" in out
    assert "GPU of borealis (gpu: 1): up to 20 GiB of its experts, the most routed first" in out
