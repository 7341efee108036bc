"""The head on a compute device (runtime/ggml_backends.py, `--gpu`), with ggml's CPU backend standing in for a GPU:
the head's weights are copied into the device backend's buffers, the step graphs are placed and run by ggml's
backend scheduler, and the routed experts and token embeddings stay mapped in host memory, which is the code a
GPU runs. The stand-in uses the same CPU kernels as the plain path, so it must give the same bits. Tests that
need a real GPU skip, saying why; tests/gpu/check.sh runs them on a machine with one."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime.engine import Engine, Request, SamplingParams
from cluster import routing_counts
from runtime import ggml_backends
from runtime.ggml_backends import ComputeDevice, DeviceChoiceError, DeviceRows, choose_device, devices
from runtime.ggml_graph import ScheduledMemory
from runtime.ggml_ops import DeviceWeight, Weight
from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import Segment, bytes_per_token
from runtime.model import KimiModel, device_weight_names
from runtime.prompt_cache import PromptCache
from runtime.prompt_store import PromptStore, model_identity
from tests.test_engine import run_together
from tests.test_llama_parity import (LOGITS_TOLERANCE, assert_greedy_follows, assert_teacher_forced_follows,
                                     our_greedy, our_teacher_forced, prompt_tokens, relative_to_range)

GPUS = [d for d in devices() if d.is_gpu]
NO_GPU = "this build of ggml has no GPU backend (CPU only); tests/gpu/check.sh builds one with CUDA and runs this"


def stand_in() -> ComputeDevice:
    cpu, _ = choose_device("cpu", 0)
    return ComputeDevice(cpu)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300)


def test_gpu_choices_on_a_build_without_a_gpu():
    if GPUS:
        pytest.skip("ggml here has a GPU backend: the choices without one cannot be seen")
    assert [d.kind for d in devices()] == ["CPU"]
    chosen, line = choose_device("auto", 10 << 30)
    assert chosen is None and "no GPU backend" in line and "computes on the CPU" in line
    assert choose_device("none", 0)[0] is None
    assert choose_device("cpu", 0)[0].kind == "CPU"
    with pytest.raises(DeviceChoiceError, match="no GPU backend.*--gpu none"):
        choose_device(0, 1 << 30)


def test_gpu_choices_on_a_build_with_a_gpu():
    if not GPUS:
        pytest.skip(NO_GPU)
    gpu = GPUS[0]
    assert choose_device("auto", 1 << 20)[0] == gpu
    too_big = gpu.free_bytes + 1
    chosen, line = choose_device("auto", too_big)
    assert (chosen is None or chosen != gpu) and "free" in line
    with pytest.raises(DeviceChoiceError, match="lacks room"):
        choose_device(0, too_big)
    with pytest.raises(DeviceChoiceError, match=f"{len(GPUS)} GPU"):
        choose_device(len(GPUS), 1 << 20)


def test_the_heads_weights_lie_on_the_device_and_the_experts_stay_mapped(tiny_q4km):
    device = stand_in()
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="experts", device=device)
    model.load(progress=False)
    names = device_weight_names(model.file)
    assert names and all(isinstance(model.weight(n), DeviceWeight) and device.holds(model.weight(n)) for n in names)
    assert device.placed_bytes == sum(model.file.info(n).nbytes for n in names)
    assert isinstance(model.weight("token_embd.weight"), Weight)  # read a few rows a step, in host memory
    layer = model.config.moe_layers[0]
    assert not any(isinstance(w, DeviceWeight) for w in model.experts.graph_weights(layer, 8).values())


def mixed_steps(model: KimiModel) -> list[np.ndarray]:
    """A prompt chunk beside a sequence decoding with three drafted rows, then a step of single rows."""
    first, second = model.new_cache(128), model.new_cache(128)
    model.forward(np.arange(5, 25), [Segment(second, 0, 20)])
    steps = [model.forward(np.arange(30, 64), [Segment(first, 0, 30), Segment(second, 30, 4, logits=4)])]
    steps.append(model.forward(np.array([7, 8]), [Segment(first, 0, 1), Segment(second, 1, 1)]))
    return steps


def test_the_scheduler_gives_the_plain_paths_bits(tiny_q4km):
    """One graph a step, placed by the scheduler on the stand-in's one backend; logits equal to the bit."""
    plain = mixed_steps(KimiModel(GGUFModelFile(tiny_q4km), repack="none"))
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="none", device=stand_in())
    on_device = mixed_steps(model)
    graphs = next(iter(model._steps.values()))
    assert isinstance(graphs.memory, ScheduledMemory) and graphs.memory.splits == 1
    for ours, theirs in zip(on_device, plain):
        assert np.array_equal(ours, theirs)


def test_kv_caches_lie_on_the_device_while_it_has_room(tiny_q4km, monkeypatch):
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="none", device=stand_in())
    cache = model.new_cache(100)
    assert all(isinstance(layer, DeviceRows) for layer in cache.keys)
    model.forward(np.arange(5, 25), [Segment(cache, 0, 20)])
    rows = cache.keys[-1][:20]
    assert rows.shape == (20, 1, model.config.kv_cache_width) and np.abs(rows).max() > 0
    assert not cache.keys[-1][20:].any()
    monkeypatch.setattr(ggml_backends, "COMPUTE_RESERVE_BYTES", 1 << 60)  # a device without room left
    assert all(isinstance(layer, np.ndarray) for layer in model.new_cache(100).keys)


def test_prompts_reused_from_device_caches_and_from_disk_give_the_cold_answer(tiny_q4km, tmp_path):
    """Reuse copies rows between device caches (host caches share pages instead), and the prompt store reads and
    writes them through the host: both must give what a cold run gives, bit for bit."""
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="experts", device=stand_in())
    per_token = bytes_per_token(model.config)
    rng = np.random.default_rng(5)
    first = Request(tuple(int(t) for t in rng.integers(30, 250, 90)), 6, SamplingParams(), top_logprobs=3)
    later = Request(first.prompt[:70] + (31, 32, 33), 6, SamplingParams(), top_logprobs=3)

    def warm_engine(store=None):
        return Engine(model, 256, max_sequences=4, max_step_tokens=16,
                      prompt_cache=PromptCache(4096 * per_token, per_token, store))
    plain = KimiModel(GGUFModelFile(tiny_q4km), repack="experts")
    cold = run_together(Engine(plain, 256, max_sequences=4, max_step_tokens=16), [later])[0]
    warm = warm_engine(PromptStore(tmp_path, model_identity(model.file), 10**9))
    run_together(warm, [first])
    assert run_together(warm, [later])[0] == cold
    assert (warm.prompt_cache.stats().rows_copied, warm.prompt_cache.stats().rows_shared) == (70, 0)
    warm.prompt_cache.store.flush()
    restarted = warm_engine(PromptStore(tmp_path, model_identity(model.file), 10**9))
    assert run_together(restarted, [later])[0] == cold and restarted.prompt_cache.stats().loaded == 1


def test_experts_copied_to_the_device_compute_there(tiny_q4km):
    """--gpu-experts-gb: a layer's pairs go to the device's copies of their experts or to the CPU, and are summed
    in slot order as one shard sums them: the CPU path's tokens, and its logits to float rounding."""
    device = stand_in()
    on_device = {1: [0, 3, 5, 9], 2: [2, 3]}
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="experts", device=device, device_experts=on_device)
    copies = model.experts.on_device.shards[0]
    assert all(device.holds(w) for kinds in copies.tensors.values() for w in kinds.values())
    assert {layer: copies.owned(layer).tolist() for layer in on_device} == on_device
    assert model.experts.graph_weights(1, 8) is None  # the step is cut where the host splits the pairs
    plain = KimiModel(GGUFModelFile(tiny_q4km), repack="experts")
    for ours, theirs in zip(mixed_steps(model), mixed_steps(plain)):
        assert relative_to_range(ours, theirs) <= 1e-5
    batch = [Request((40 + seed, 41, 42, 43), 12, SamplingParams()) for seed in range(3)]
    assert [[o.token for o in out] for out in run_together(Engine(model, 128), batch)] == \
        [[o.token for o in out] for out in run_together(Engine(plain, 128), batch)]


def test_the_most_routed_experts_are_chosen_for_the_device():
    expert_bytes = np.array([[0, 0, 0], [10, 10, 10], [10, 10, 10]])  # layer 0 is dense
    counts = np.array([[0, 0, 0], [5, 50, 1], [40, 2, 60]])
    assert routing_counts.hottest(counts, expert_bytes, 35) == {2: [2, 0], 1: [1]}
    assert routing_counts.hottest(None, expert_bytes, 45) == {1: [0, 1], 2: [0, 1]}
    assert routing_counts.hottest(counts, expert_bytes, 9) == {}


def test_experts_on_a_gpu_need_one(tiny_q4km):
    result = cli("generate", str(tiny_q4km), "--prompt", "hi", "--gpu", "none", "--gpu-experts-gb", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 2  # the backends line, then the error
    assert "--gpu-experts-gb needs a GPU" in result.stderr


def test_sequences_sharing_steps_on_the_device_get_their_solo_tokens(tiny_q4km):
    """--deterministic's promise holds through the scheduler: its CPU backend runs each row's attention alone."""
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="experts", device=stand_in())
    rng = np.random.default_rng(11)
    batch = [Request(tuple(int(t) for t in rng.integers(100, 2000, int(rng.integers(1, 60)))), 10, SamplingParams())
             for _ in range(6)]
    together = run_together(Engine(model, context_size=256, max_sequences=6, max_step_tokens=16), batch)
    for request, outputs in zip(batch, together):
        solo = run_together(Engine(model, context_size=256), [request])[0]
        assert [(o.token, o.logprob) for o in outputs] == [(o.token, o.logprob) for o in solo]


def test_generate_with_workers_on_the_device_gives_the_cpus_tokens(tiny_q4km):
    """Experts on an expert worker: the step is cut at every MoE layer, and each piece runs through the
    scheduler; the tokens are those of the plain path in one process."""
    args = ["generate", str(tiny_q4km), "--prompt", "Pooling memory across machines", "--max-tokens", "12",
            "--json", "--repack", "experts"]
    alone = cli(*args, "--gpu", "none")
    spread = cli(*args, "--gpu", "cpu", "--workers", "1")
    assert alone.returncode == 0 and spread.returncode == 0, spread.stderr
    assert "the CPU standing in" in spread.stderr
    assert json.loads(spread.stdout)["tokens"] == json.loads(alone.stdout)["tokens"]


def test_a_gpu_that_is_not_there_is_one_line(tiny_q4km):
    result = cli("generate", str(tiny_q4km), "--prompt", "hi", "--gpu", str(len(GPUS)))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert ("no GPU backend" if not GPUS else f"{len(GPUS)} GPU") in result.stderr


def test_the_gpu_holds_the_head_and_the_scheduler_cuts_the_step_at_the_experts(tiny_q4km):
    if not GPUS:
        pytest.skip(NO_GPU)
    device = ComputeDevice(GPUS[0])
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="experts", device=device)
    steps = mixed_steps(model)
    assert all(device.holds(model.weight(n)) for n in device_weight_names(model.file))
    graphs = next(iter(model._steps.values()))
    # Each MoE layer's routed experts run on the CPU, where they lie: a GPU part and a CPU part per layer at least.
    assert graphs.memory.splits >= 2 * len(model.config.moe_layers)
    plain = mixed_steps(KimiModel(GGUFModelFile(tiny_q4km), repack="experts"))
    for ours, theirs in zip(steps, plain):
        assert relative_to_range(ours, theirs) <= LOGITS_TOLERANCE


def test_the_gpu_follows_llama_cpp(tiny_q4km):
    """Greedy tokens and logits with the head on the GPU against llama.cpp, as the CPU path is held."""
    if not GPUS:
        pytest.skip(NO_GPU)
    from tests.test_llama_parity import llama_greedy
    prompt = prompt_tokens(tiny_q4km)
    reference = llama_greedy(tiny_q4km, False)
    tokens, prompt_logits = our_greedy(tiny_q4km, prompt, "experts", on_device=GPUS[0])
    assert_greedy_follows(tokens, reference)
    assert relative_to_range(prompt_logits, reference["logits"][0]) <= reference["tolerance"]
    assert_teacher_forced_follows(our_teacher_forced(tiny_q4km, prompt, reference["tokens"][:-1], "experts",
                                                     GPUS[0]), reference)
