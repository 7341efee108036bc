"""The runtime against llama.cpp itself, on the project's own models quantized by llama.cpp.

llama.cpp runs in a subprocess. On x86 it has two CPU paths that round differently: plain kernels over
the weights as stored, and (its default) "repack" kernels over interleaved copies. This runtime has the
same two; each is held to llama.cpp's matching path, within the spread llama.cpp shows between its own.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from runtime.kv_cache import Segment
from runtime.engine import Engine, GenerationStats
from runtime.ggml_backends import ComputeDevice, DeviceInfo, choose_device
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.tokenizer import Tokenizer
from tests import llama_oracle
from tests.gguf_tools import rewrite_gguf

PROMPT = "<|im_user|>user<|im_middle|>Tell me about pooling memory across computers.<|im_end|>"
NUM_TOKENS = 32
# Both sides run ggml kernels, but two ggml builds round a few activations one ulp apart (one fuses an
# RMS norm with its scale, the other does not); ggml's 8-bit activation quantization turns such an ulp into
# a full quantization step now and then, and a random model's router carries it through the layers:
# measured on the tiny models, relative to the logit range, F32 1e-4, Q8_0 3.6e-3, Q4_K_M 8.6e-3, Q2_K 9.2e-3.
# And the runtime attends a prompt's rows with matmuls but a decoding row with flash attention, where
# llama.cpp (the oracle) uses one of them for both; its own two give logits as far apart as 4.5e-2 on the tiny
# Q4_K_M (plain kernels), 6.9e-2 on Q8_0, 8.0e-2 on Q5_K_M. So each case is held within LOGITS_TOLERANCE plus
# llama.cpp's own spread between its attention paths on that model and prompt. A real bug (a wrong scale,
# position, expert) moves logits by tens of percent of the range.
LOGITS_TOLERANCE = 1.5e-2


def prompt_tokens(path) -> list[int]:
    return Tokenizer.from_metadata(GGUFModelFile(path).metadata).encode(PROMPT)


def our_model(path, repack: str, on_device: bool | DeviceInfo = False) -> KimiModel:
    """on_device: the head's weights on a compute device: the one given, or True for ggml's CPU backend standing in
    for a GPU."""
    if on_device is True:
        on_device = choose_device("cpu", 0)[0]
    return KimiModel(GGUFModelFile(path), repack=repack, device=ComputeDevice(on_device) if on_device else None)


def our_greedy(path, prompt: list[int], repack: str = "head", on_device: bool | DeviceInfo = False
               ) -> tuple[list[int], np.ndarray]:
    engine = Engine(our_model(path, repack, on_device), context_size=256)
    stats = GenerationStats()
    tokens = list(engine.generate(prompt, NUM_TOKENS, stats=stats))
    return tokens, stats.prompt_logits


def our_teacher_forced(path, prompt: list[int], tokens: list[int], repack: str = "head",
                       on_device: bool | DeviceInfo = False) -> np.ndarray:
    """Logits after the prompt and after each of `tokens` fed in turn: [len(tokens) + 1, V]."""
    model = our_model(path, repack, on_device)
    cache = model.new_cache(len(prompt) + len(tokens))
    steps = [model.forward(np.array(prompt), [Segment(cache, 0, len(prompt))])[0]]
    for token in tokens:
        steps.append(model.forward(np.array([token]), [Segment(cache, 0, 1)])[0])
    return np.stack(steps)


def relative_to_range(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| over the (largest) logit range of the reference rows."""
    return float(np.abs(ours - reference).max() / np.ptp(reference, axis=-1).max())


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_greedy_follows(tokens: list[int], reference: dict) -> None:
    """Greedy decoding follows llama.cpp all the way, or until a near-tie in llama.cpp's own logits (where its
    own CPU paths may split as well)."""
    agreed = common_prefix(tokens, reference["tokens"])
    if agreed < min(len(tokens), len(reference["tokens"])):
        split = np.array(reference["logits"][agreed])
        top2 = np.sort(split)[-2:]
        assert top2[1] - top2[0] <= 2 * reference["tolerance"] * np.ptp(split)


def assert_teacher_forced_follows(steps: np.ndarray, reference: dict) -> None:
    """Teacher-forced along llama.cpp's tokens: every step's logits within the tolerance, and llama.cpp's token
    wherever its top two logits are further apart than that."""
    logits, tolerance = np.array(reference["logits"]), reference["tolerance"]
    assert relative_to_range(steps, logits) <= tolerance
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * np.ptp(logits, axis=1)
    assert np.array_equal(steps.argmax(axis=1)[clear], np.array(reference["tokens"])[clear])


def llama_reference(path, prompt: list[int], n: int, repack: bool, tolerance: float = LOGITS_TOLERANCE) -> dict:
    """llama.cpp's greedy tokens and logits (flash attention, its default), and the tolerance they allow: the
    given one plus llama.cpp's own spread against its plain attention along the same tokens."""
    reference = llama_oracle.generate(path, prompt, n, repack=repack)
    plain = llama_oracle.generate(path, prompt, n, repack=repack, forced=reference["tokens"][:-1], flash=False)
    return {**reference, "tolerance": tolerance + relative_to_range(plain["logits"], reference["logits"])}


@functools.lru_cache(maxsize=None)
def llama_greedy(path, repack: bool) -> dict:
    return llama_reference(path, prompt_tokens(path), NUM_TOKENS, repack)


# Our weight layout and the llama.cpp path that uses the same kernels: everything read in place
# against llama.cpp's plain kernels; head weights, or every weight, repacked (our default: the prompt's
# experts then run grouped by expert) against llama.cpp's default; the head on a compute device (the CPU
# standing in for a GPU: weights in the device backend's buffers, graphs run by ggml's scheduler) against the
# plain kernels, which it runs.
MODES = {"in-place": ("none", False, False), "repacked": ("head", True, False), "all-repacked": ("all", True, False),
         "device": ("experts", False, True)}


@pytest.fixture(scope="session")
def tiny_split(make_tiny, model_dir):
    return rewrite_gguf(make_tiny("Q4_K_M"), model_dir / "split" / "tiny-Q4_K_M.gguf", split_parts=3)


@pytest.fixture(scope="session")
def tiny_fused(make_tiny, model_dir):
    return rewrite_gguf(make_tiny("Q4_K_M"), model_dir / "tiny-Q4_K_M-fused.gguf", fuse_gate_up=True)


@pytest.fixture(scope="session")
def model_path(request, make_tiny, tiny_split, tiny_fused):
    quant, legacy, variant = request.param
    return {"split": tiny_split, "fused": tiny_fused}.get(variant) or make_tiny(quant, legacy)


CASES = {  # id: (quant, legacy attention, file variant)
    "F32": (None, False, None), "Q8_0": ("Q8_0", False, None), "Q4_K_M": ("Q4_K_M", False, None),
    "Q2_K": ("Q2_K", False, None), "Q4_K_M-split": ("Q4_K_M", False, "split"),
    "Q4_K_M-fused-gate-up": ("Q4_K_M", False, "fused"), "Q8_0-legacy-kv_b": ("Q8_0", True, None),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model_path", list(CASES.values()), ids=list(CASES), indirect=True)
def test_greedy_tokens_and_logits_match_llama_cpp(model_path, mode):
    our_repack, llama_repack, on_device = MODES[mode]
    prompt = prompt_tokens(model_path)
    reference = llama_greedy(model_path, llama_repack)
    tokens, prompt_logits = our_greedy(model_path, prompt, our_repack, on_device)
    assert_greedy_follows(tokens, reference)
    assert relative_to_range(prompt_logits, reference["logits"][0]) <= reference["tolerance"]
    assert_teacher_forced_follows(our_teacher_forced(model_path, prompt, reference["tokens"][:-1], our_repack,
                                                     on_device), reference)


@pytest.mark.parametrize("variant", ["tiny_split", "tiny_fused"])
def test_split_and_fused_files_give_the_plain_files_logits_exactly(make_tiny, variant, request):
    path = request.getfixturevalue(variant)
    prompt = prompt_tokens(path)
    assert np.array_equal(our_teacher_forced(make_tiny("Q4_K_M"), prompt, [5, 6, 7]),
                          our_teacher_forced(path, prompt, [5, 6, 7]))


def test_cli_generate_json_and_logits_out(tiny_q4km, tmp_path):
    logits_file = tmp_path / "logits.npy"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", str(tiny_q4km), "--prompt", PROMPT,
                             "--max-tokens", "8", "--json", "--logits-out", str(logits_file)],
                            capture_output=True, text=True, check=True)
    out = json.loads(result.stdout)
    reference = llama_reference(tiny_q4km, out["prompt_token_ids"], 8, repack=True)
    assert out["prompt_token_ids"] == prompt_tokens(tiny_q4km)
    # The CLI stops at an end-of-generation token; up to there it must follow llama.cpp.
    assert out["tokens"] == reference["tokens"][: len(out["tokens"])]
    assert len(out["tokens"]) == 8 or out["finish_reason"] == "stop"
    assert out["tokens_per_s"] > 0
    logits = np.load(logits_file)
    assert logits.dtype == np.float32 and logits.shape == reference["logits"][0].shape
    assert relative_to_range(logits, reference["logits"][0]) <= reference["tolerance"]


def test_a_prompt_whose_experts_run_grouped_matches_llama_cpp(tiny_q4km):
    """A prompt long enough that `--repack all` runs each layer's experts grouped by expert (dense
    interleaved GEMMs instead of mul_mat_id) still gives llama.cpp's logits and tokens."""
    prompt = prompt_tokens(tiny_q4km) * 4
    model = KimiModel(GGUFModelFile(tiny_q4km), repack="all")
    assert model.experts.shard.runs_grouped(1, len(prompt) * model.config.num_experts_used)
    reference = llama_reference(tiny_q4km, prompt, 8, repack=True)
    tokens, prompt_logits = our_greedy(tiny_q4km, prompt, "all")
    assert relative_to_range(prompt_logits, reference["logits"][0]) <= reference["tolerance"]
    assert_greedy_follows(tokens, reference)
