"""Batch invariance under `--deterministic`: a sequence's tokens and log-probabilities are bit for bit those of its
solo run, whatever shares its steps (other prompts cut into chunks, other sequences decoding) — for the head's
matmuls and attention as well as the experts, on models like the hidden ones users run (quantized heads, a float
head as UD-Q8_K_XL's BF16, a width of 1024), in one process and through `serve --workers 2`."""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from runtime.engine import Engine, Request, SamplingParams
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.synthetic.demo_model import make_model
from tests.test_engine import run_together
from tests.test_serve import cli, ready_url, start, stop

MODELS = {  # id: (preset, quant, seed)
    "tiny-Q4_K_M": ("tiny", "Q4_K_M", 3),
    "tiny-BF16": ("tiny", "BF16", 4),  # a float head: ggml multiplies float weights by several rows at once
    "small-Q4_K_M": ("small", "Q4_K_M", 5),  # width 1024
}


@pytest.fixture(scope="module")
def models(model_dir):
    made = {}

    def model(name: str):
        if name not in made:
            preset, quant, seed = MODELS[name]
            made[name] = make_model(model_dir / "invariance" / f"{name}-{seed}.gguf", preset, quant=quant, seed=seed)
        return made[name]
    return model


def requests(seed: int, count: int = 8) -> list[Request]:
    """Greedy requests with log-probabilities, prompts of 1 to 60 tokens."""
    rng = np.random.default_rng(seed)
    return [Request(tuple(int(t) for t in rng.integers(100, 2000, int(rng.integers(1, 60)))), 10, SamplingParams(),
                    top_logprobs=3) for _ in range(count)]


@pytest.mark.parametrize("repack", ["experts", "none"])  # what --deterministic may serve with
@pytest.mark.parametrize("name", list(MODELS))
def test_many_concurrent_sequences_equal_their_solo_runs_bit_for_bit(models, name, repack):
    model = KimiModel(GGUFModelFile(models(name)), repack=repack)
    batch = requests(seed=len(name))
    # Steps of 16 rows: prompts are cut at many places and share steps with other prompts' chunks and with
    # sequences that decode; 8 slots: everything runs at once.
    together = run_together(Engine(model, context_size=256, max_sequences=8, max_step_tokens=16), batch)
    for request, outputs in zip(batch, together):
        solo = run_together(Engine(model, context_size=256), [request])[0]
        assert [(o.token, o.logprob, o.top_logprobs) for o in outputs] == \
            [(o.token, o.logprob, o.top_logprobs) for o in solo]


def test_a_long_prompt_in_large_chunks_equals_it_fed_two_rows_a_step(models):
    """Past the sizes where ggml's flash attention has faster paths (64 rows or more in tiles, a lone row's 512
    positions or more split across the threads), a prompt in chunks of 512 rows and the same prompt two rows per
    step give the same tokens and log-probabilities, bit for bit."""
    model = KimiModel(GGUFModelFile(models("tiny-Q4_K_M")), repack="none")
    prompt = tuple(int(t) for t in np.random.default_rng(7).integers(100, 2000, 600))
    request = Request(prompt, 8, SamplingParams(), top_logprobs=3)
    large, small = (run_together(Engine(model, context_size=640, max_sequences=1, max_step_tokens=rows),
                                 [request])[0] for rows in (512, 2))
    assert [(o.token, o.logprob, o.top_logprobs) for o in large] == \
        [(o.token, o.logprob, o.top_logprobs) for o in small]


def completions_at_once(url: str, prompts: list[str], max_tokens: int) -> list[tuple[str, list[float]]]:
    """Greedy completions of all prompts sent at once: each one's text and its tokens' log-probabilities."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id

    def complete(prompt: str) -> tuple[str, list[float]]:
        choice = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           logprobs=1).choices[0]
        return choice.text, choice.logprobs.token_logprobs
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(complete, prompts))


@pytest.mark.slow
def test_deterministic_serve_on_two_workers_gives_each_request_its_solo_answer(models):
    """The reported case: a width-1024 Q4_K_M model served with --workers 2 --deterministic, several greedy
    requests at once against each prompt run alone on the same server: texts and log-probabilities."""
    process = start(cli("serve", str(models("small-Q4_K_M")), "--workers", "2", "--port", "0", "--threads", "1",
                        "--deterministic", "--max-sequences", "6", "--step-tokens", "32"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "KIMI_API_KEY": ""})
    try:
        url = ready_url(process)
        # Prompts of 10 to 70 tokens in steps of 32 rows: they are cut and share steps with each other's decoding.
        prompts = [f"Tell me {word} about pooling memory across computers." * repeat for word, repeat in
                   (("one thing", 1), ("two things", 3), ("more", 2), ("everything", 5), ("a little", 4), ("all", 6))]
        solo = [completions_at_once(url, [prompt], 24)[0] for prompt in prompts]
        assert completions_at_once(url, prompts, 24) == solo
    finally:
        stop(process)
