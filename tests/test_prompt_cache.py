"""Prompt reuse (runtime/prompt_cache.py): a request whose prompt starts as an earlier one did computes only the
rest, and gets exactly what a cold run gets: the same tokens and bit-equal log-probabilities with the kernels
`--deterministic` serves with (each row's math its own), whatever the match's length and however the steps split
the prompts. Through the API, the reuse shows in each protocol's usage, the access
line and /metrics."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import anthropic
import httpx
import numpy as np
import openai
import pytest

from runtime.engine import Engine, Request, TokenOutput
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import bytes_per_token
from runtime.model import KimiModel
from runtime.prompt_cache import PromptCache
from runtime.prompt_store import PromptStore, model_identity
from runtime.sampling import SamplingParams
from tests.test_api import KEY, parts, start_server, stop_server  # noqa: F401 (parts: a fixture)
from tests.test_serve import cli, start, stop

CONTEXT = 512
STEP_TOKENS = 16  # small steps: cold and warm runs split their prompts at different places


@pytest.fixture(scope="module")
def model(make_tiny):
    # As `--deterministic` serves: the head's weights in place, the routed experts interleaved (run row by row).
    return KimiModel(GGUFModelFile(make_tiny("Q4_K_M")), GgmlRunner(2), repack="experts")


def prompt(seed: int, length: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(30, 250, length))


def request(tokens: tuple[int, ...], max_tokens: int = 6) -> Request:
    return Request(tokens, max_tokens, SamplingParams(), top_logprobs=3)


def engine(model, budget_tokens: int | None = 4096) -> Engine:
    cache = None if budget_tokens is None else \
        PromptCache(budget_tokens * bytes_per_token(model.config), bytes_per_token(model.config))
    return Engine(model, CONTEXT, max_sequences=4, max_step_tokens=STEP_TOKENS, prompt_cache=cache)


def run(engine: Engine, *requests: Request) -> list[tuple[list[TokenOutput], int]]:
    """Each request's outputs and the prompt tokens it reused, submitted together and run to the end."""
    outputs = [[] for _ in requests]
    sequences = [engine.submit(r, sink.append) for r, sink in zip(requests, outputs)]
    while engine.step():
        pass
    return [(got, sequence.reused) for got, sequence in zip(outputs, sequences)]


def cold(model, *requests: Request) -> list[list[TokenOutput]]:
    return [run(engine(model, budget_tokens=None), r)[0][0] for r in requests]


def test_a_prompt_that_starts_as_an_earlier_one_reuses_it_and_gets_the_cold_answer(model):
    first = request(prompt(1, 100))
    # Matches that end mid-step and on a step's edge, a whole earlier prompt, and the earlier reply too.
    later = [request(first.prompt[:37] + prompt(2, 20)), request(first.prompt[:48] + prompt(3, 5)),
             request(first.prompt + prompt(4, 9))]
    warm = engine(model)
    (answer, reused), = run(warm, first)
    assert reused == 0
    with_reply = request(first.prompt + tuple(o.token for o in answer) + prompt(5, 7))
    expected_reuse = [37, 48, 100, 100 + len(answer) - 1]  # the reply's last token was never fed
    for case, wanted in zip([*later, with_reply], expected_reuse):
        (got, reused), = run(warm, case)
        assert reused == wanted
        assert got == cold(model, case)[0]  # tokens, log-probabilities and top-3 lists, bit for bit


def test_the_same_prompt_again_computes_only_its_last_token(model):
    again = request(prompt(6, 60))
    warm = engine(model)
    run(warm, again)
    (got, reused), = run(warm, again)
    assert reused == 59 and got == cold(model, again)[0]


def test_a_conversation_re_rendered_differently_reuses_up_to_the_first_difference(model):
    """Kimi's template drops earlier turns' reasoning: the next prompt differs inside, and the match stops there."""
    turn = prompt(7, 80)
    warm = engine(model)
    run(warm, request(turn))
    changed = turn[:50] + (turn[50] + 1,) + turn[51:] + prompt(8, 10)
    (got, reused), = run(warm, request(changed))
    assert reused == 50 and got == cold(model, request(changed))[0]


def test_requests_that_share_a_prefix_at_once_each_get_their_cold_answer(model):
    shared = prompt(9, 70)
    a, b = request(shared + prompt(10, 6), max_tokens=8), request(shared + prompt(11, 6), max_tokens=8)
    warm = engine(model)
    outputs = run(warm, a, b)
    assert outputs[0][1] == 0
    # b reads a's rows while a runs (its first 70 are there once a has prefilled past them) or after a ended
    for (got, _), expected in zip(outputs, cold(model, a, b)):
        assert got == expected
    (again, reused), = run(warm, request(shared + prompt(12, 3)))
    assert reused == 70 and again == cold(model, request(shared + prompt(12, 3)))[0]
    # The 70 rows are a's or b's own pages as far as whole pages go (kv_memory.py), a copy after them.
    stats, run_rows = warm.prompt_cache.stats(), 4096 // np.gcd(4096, bytes_per_token(model.config) //
                                                                 model.config.num_layers)
    assert stats.rows_shared == 70 // run_rows * run_rows > 0 and stats.rows_copied == 70 - stats.rows_shared


def test_kept_caches_stay_within_the_budget_least_recently_used_first(model):
    warm = engine(model, budget_tokens=150)
    first, second, third = (request(prompt(seed, 60), max_tokens=1) for seed in (13, 14, 15))
    for r in (first, second):
        run(warm, r)
    assert warm.prompt_cache.stats().kept == 2
    run(warm, request(first.prompt + prompt(16, 3), max_tokens=1))  # first used again: second is now the oldest
    run(warm, third)
    stats = warm.prompt_cache.stats()
    assert stats.kept_tokens * warm.prompt_cache.bytes_per_token == stats.kept_bytes <= 150 * \
        warm.prompt_cache.bytes_per_token
    assert stats.evictions >= 1
    assert run(warm, request(second.prompt, max_tokens=1))[0][1] == 0  # evicted
    assert run(warm, request(third.prompt, max_tokens=1))[0][1] == 59  # kept


def test_kept_caches_make_way_for_the_running_sequences(model):
    """serve's default: the prompt cache shares the head's KV memory with the running sequences, and each of
    those may fill its whole context: they come first."""
    per_token = bytes_per_token(model.config)
    cache = PromptCache(3 * 128 * per_token, per_token, shares_with_running=True)
    warm = Engine(model, 128, max_sequences=3, max_step_tokens=STEP_TOKENS, prompt_cache=cache)
    first, second = (request(prompt(seed, 70), max_tokens=1) for seed in (17, 18))
    for r in (first, second):
        run(warm, r)
    assert (cache.stats().kept, cache.stats().kept_tokens) == (2, 140)

    def running(*seeds):
        sequences = [warm.submit(request(prompt(seed, 10), max_tokens=20), lambda output: None) for seed in seeds]
        warm.step()
        return sequences

    # Two running sequences may take 256 of the 384 rows: 128 are left, and the older kept cache goes.
    running(19, 20)
    assert (cache.stats().kept, cache.stats().evictions) == (1, 1)
    while warm.step():
        pass
    # Three leave nothing to keep while they run.
    for sequence in running(21, 22, 23):
        assert sequence.cache.capacity == 128
    assert cache.stats().kept == 0
    while warm.step():
        pass
    assert cache.stats().kept == 3, "each has ended and is kept"
    assert run(warm, request(first.prompt, max_tokens=1))[0][1] == 0


def test_a_cancelled_prefill_leaves_what_it_computed_for_the_retry(model):
    """An agent whose client gave up mid-prefill sends the same prompt again."""
    long_prompt = request(prompt(17, 120))
    warm = engine(model)
    sequence = warm.submit(long_prompt, lambda output: None)
    for _ in range(3):
        warm.step()  # three chunks of STEP_TOKENS
    warm.cancel(sequence)
    warm.step()
    (got, reused), = run(warm, long_prompt)
    assert reused == 3 * STEP_TOKENS and got == cold(model, long_prompt)[0]


# ---- through the API ----

@pytest.fixture(scope="module")
def server(parts):  # noqa: F811
    model, tokenizer = parts
    lines: list[str] = []
    server = start_server(model, tokenizer, access_log=lines.append, context=CONTEXT, max_sequences=2,
                          prompt_cache=PromptCache(10**8, bytes_per_token(model.config)))
    server.service.metrics.watch_prompt_cache(server.service.engine.prompt_cache)
    server.access_lines = lines
    yield server
    stop_server(server)


CONVERSATION = [{"role": "user", "content": "Tell me about mixture-of-experts models, in detail please."}]


def test_usage_the_access_line_and_metrics_say_what_was_reused(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    first = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=4, temperature=0)
    turn = CONVERSATION + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert f"{second.usage.prompt_tokens} prompt ({cached} reused)" in server.access_lines[-1]
    usage = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
        model="tiny", max_tokens=4, messages=turn).usage
    assert usage.cache_read_input_tokens == second.usage.prompt_tokens - 1  # all but the last token, again
    assert usage.input_tokens == 1 and usage.cache_creation_input_tokens == 0
    metrics = httpx.get(f"{server.url}/metrics").text
    reused = float(re.search(r"^kimi_prompt_tokens_reused_total (\S+)$", metrics, re.M)[1])
    assert reused == cached + usage.cache_read_input_tokens
    assert float(re.search(r"^kimi_prompt_cache_entries (\S+)$", metrics, re.M)[1]) >= 1


# ---- on disk (--prompt-cache-dir) ----

def stored_engine(model, folder, budget_bytes: int = 10**9) -> Engine:
    per_token = bytes_per_token(model.config)
    store = PromptStore(folder, model_identity(model.file), budget_bytes)
    return Engine(model, CONTEXT, max_sequences=4, max_step_tokens=STEP_TOKENS,
                  prompt_cache=PromptCache(4096 * per_token, per_token, store))


def seen_before_a_restart(model, folder, tokens: tuple[int, ...]) -> Path:
    """Serve `tokens` once with a store in `folder`; returns the file it left."""
    before = stored_engine(model, folder)
    run(before, request(tokens))
    before.prompt_cache.store.flush()
    (path,) = folder.glob("*/*.kv")
    return path


def test_a_restarted_server_reads_a_prompt_it_has_seen_from_disk(model, tmp_path):
    system = prompt(20, 90)
    seen_before_a_restart(model, tmp_path, system)
    restarted = stored_engine(model, tmp_path)
    follow = request(system + prompt(21, 8))
    (got, reused), = run(restarted, follow)
    assert reused == 90 and got == cold(model, follow)[0]
    assert restarted.prompt_cache.stats().loaded == 1


@pytest.mark.parametrize("damage", ["a flipped byte", "cut in half", "another model's"])
def test_a_damaged_or_foreign_file_is_skipped_with_one_warning(model, tmp_path, capsys, damage):
    system = prompt(22, 90)
    path = seen_before_a_restart(model, tmp_path, system)
    data = path.read_bytes()
    if damage == "a flipped byte":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    elif damage == "cut in half":
        data = data[:len(data) // 2]
    else:
        data = data.replace(path.parent.name.encode(), b"0" * len(path.parent.name))
    path.write_bytes(data)
    capsys.readouterr()
    restarted = stored_engine(model, tmp_path)
    follow = request(system + prompt(23, 4))
    (got, reused), = run(restarted, follow)
    assert reused == 0 and got == cold(model, follow)[0]
    assert capsys.readouterr().err.count("warning: skipped") == 1 and not path.exists()


def test_the_folder_keeps_to_its_budget_least_recently_used_out(model, tmp_path):
    size = seen_before_a_restart(model, tmp_path / "probe", prompt(24, 60)).stat().st_size
    engine = stored_engine(model, tmp_path, budget_bytes=int(2.5 * size))
    prompts = [prompt(seed, 60) for seed in (25, 26, 27, 28)]
    for tokens in prompts:
        run(engine, request(tokens, max_tokens=1))
    engine.prompt_cache.store.flush()
    assert len(list(tmp_path.glob("*/*.kv"))) == 2  # the last two (the probe wrote below probe/)
    restarted = stored_engine(model, tmp_path, budget_bytes=int(2.5 * size))
    reuses = [run(restarted, request(tokens + (5,), max_tokens=1))[0][1] for tokens in (prompts[0], prompts[3])]
    assert reuses == [0, 60]


def test_serve_with_a_prompt_cache_dir_skips_a_seen_prompt_after_a_restart(make_tiny, tmp_path):
    """`serve --prompt-cache-dir`: the same conversation after a restart computes only its last token."""
    def serve_once() -> int:
        console = tmp_path / "console.txt"
        with console.open("w") as out:
            process = start(cli("serve", str(make_tiny("Q4_K_M")), "--port", "0", "--prompt-cache-dir",
                                str(tmp_path / "kv")), stderr=out, stdout=subprocess.DEVNULL,
                            env={**os.environ, "KIMI_API_KEY": ""})
        try:
            deadline = time.monotonic() + 120
            while not (url := re.search(r"ready at (http://127\.0\.0\.1:\d+)/v1", console.read_text())):
                assert process.poll() is None and time.monotonic() < deadline, console.read_text()
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{url[1]}/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=2)
        finally:
            stop(process)  # SIGTERM: the server writes what it kept before it exits
        return reply.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens
    assert serve_once()[0] == 0
    cached, prompt_tokens = serve_once()
    assert cached == prompt_tokens - 1


def test_a_long_context_prefills_in_chunks_whose_attention_fits_its_memory(model, monkeypatch):
    """At a long context a prompt's chunk is cut so that its attention scores stay within a bound; the rows
    are each their own, so the answer is the one whole chunks give."""
    long = request(prompt(40, 300), max_tokens=4)
    expected = cold(model, long)[0]
    heads = model.config.num_heads
    monkeypatch.setattr("runtime.ggml_forward.ATTENTION_SCORES_BYTES", 2 * 4 * heads * 64 * 256)
    sizes = []
    bounded = Engine(model, CONTEXT, max_sequences=4, max_step_tokens=256)
    bounded.on_step = lambda rows, seconds: sizes.append(rows)
    (got, _), = run(bounded, long)
    assert got == expected
    ends = np.cumsum(sizes)
    chunks = sizes[:int(np.searchsorted(ends, 300)) + 1]
    assert sum(chunks) == 300 and len(chunks) > 2, "300 rows in more steps than the 256-row budget needs"
    assert all(rows * end <= 64 * 256 for rows, end in zip(chunks, ends)), "rows x positions within the bound"


def test_without_memory_files_the_shared_rows_are_copied(model, monkeypatch):
    """Where the system has no memory files (not Linux), caches are plain arrays: the rows are copied, and
    the answers are the same."""
    monkeypatch.setattr("runtime.kv_memory.SHARING", False)
    first, second = request(prompt(50, 80)), request(prompt(50, 80)[:70] + prompt(51, 5))
    warm = engine(model)
    run(warm, first)
    (got, reused), = run(warm, second)
    assert reused == 70 and got == cold(model, second)[0]
    stats = warm.prompt_cache.stats()
    assert (stats.rows_shared, stats.rows_copied) == (0, 70)
