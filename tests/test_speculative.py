"""Speculative decoding: drafts from the context, checked in the same step, change nothing in what is written.

A scripted model recites a text its prompt quotes (runtime/synthetic/scripted_model.py), so that drafts are
right; a prompt that quotes the text with some words changed makes some of them wrong. Kernels are the plain
ones (repack "none", as --deterministic), so every row's logits are its own: with and without drafts, tokens
and log-probabilities are compared bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.engine import Engine, Request, TokenOutput
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.grammar import GrammarTokenizer
from runtime.kv_cache import Segment, bytes_per_token
from runtime.model import KimiModel
from runtime.prompt_cache import PromptCache
from runtime.sampling import SamplingParams
from runtime.speculative import MIN_MATCH, Drafter, DraftStore, TokenIndex, parse_speculate
from runtime.synthetic.demo_vocab import demo_tokenizer_metadata
from runtime.synthetic.scripted_model import recitable, recital, recital_prompt, write_scripted_model
from runtime.tokenizer import Tokenizer
from tests.test_api import KEY, start_server, stop_server
from tests.test_engine import run_together
from tests.test_serve import cli, expert_worker_pids, metric_samples, ready_url, start, stop, wait_for_health

CONTEXT = 1024


@pytest.fixture(scope="module")
def reciter(reciter_file):
    path, tokenizer, text, prompt, recited = reciter_file
    model = KimiModel(GGUFModelFile(path), GgmlRunner(2), repack="none")
    words = text.split()
    changed = " ".join("changed" if i % 9 == 4 else word for i, word in enumerate(words))
    return model, tokenizer, text, prompt, recited, tuple(recital_prompt(changed, tokenizer))


@pytest.fixture(scope="module")
def reciter_file(tmp_path_factory):
    """A scripted model that recites a 120-token text its prompt quotes: (path, tokenizer, text, prompt, the
    tokens it writes)."""
    tokenizer = Tokenizer.from_metadata(demo_tokenizer_metadata("instruct"))
    text = recitable(tokenizer, 120)
    prompt, script = recital(text, tokenizer)
    path = write_scripted_model(tmp_path_factory.mktemp("reciter") / "reciter.gguf", [script])
    return path, tokenizer, text, prompt, script[2:]


def run(engine: Engine, *requests: Request) -> list[list[TokenOutput]]:
    return run_together(engine, list(requests))


def recite(prompt, tokenizer, max_tokens=400, **fields) -> Request:
    return Request(tuple(prompt), max_tokens, stop_tokens=frozenset(tokenizer.eog_ids), top_logprobs=3, **fields)


# ---- exactness ----

@pytest.mark.parametrize("quoted", ["exactly", "with words changed"])
def test_drafts_change_no_token_and_no_logprob(reciter, quoted):
    model, tokenizer, _, prompt, recited, changed = reciter
    request = recite(prompt if quoted == "exactly" else changed, tokenizer)
    [plain] = run(Engine(model, CONTEXT), request)
    drafting = Engine(model, CONTEXT, max_draft=16)
    steps = []
    drafting.on_step = lambda rows, seconds: steps.append(rows)
    [drafted] = run(drafting, request)
    assert [o.token for o in plain] == recited  # the model recites whatever its prompt quotes
    assert drafted == plain  # tokens, finish reasons, log-probabilities and top-3 lists, bit for bit
    assert drafting.accepted_tokens > len(recited) / 3
    assert len(steps) < 0.65 * len(recited)  # several tokens per step (without drafts: one step per token)
    if quoted == "exactly":
        assert drafting.drafted_tokens - drafting.accepted_tokens <= 2
    else:  # every changed word rejects a draft; the recital goes on, its cache's rejected rows given back
        assert drafting.drafted_tokens - drafting.accepted_tokens >= len(recited) // 40


def test_sampled_tokens_are_the_same_with_the_same_seed(reciter):
    """Each token is drawn from its own position's distribution with one draw of the sequence's generator, in
    the same order with or without drafts: the same seed gives the same tokens. Hot enough that samples often
    leave the recital, so that drafts are both taken and rejected."""
    model, tokenizer, _, prompt, _, _ = reciter
    drafting = Engine(model, CONTEXT, max_draft=8)
    texts = set()
    for seed in range(12):
        params = SamplingParams(temperature=4.0, top_k=400, repetition_penalty=1.05, seed=seed)
        request = Request(tuple(prompt), 24, params, top_logprobs=2)
        [plain], [drafted] = run(Engine(model, CONTEXT), request), run(drafting, request)
        assert drafted == plain
        texts.add(tuple(o.token for o in plain))
    assert drafting.drafted_tokens > drafting.accepted_tokens > 0
    assert len(texts) > 1  # sampled, not greedy


def test_a_drafted_row_samples_from_the_models_distribution(reciter):
    """A statistical check of the drafted rows themselves. At temperature 3 the model keeps to the recital with
    p ~ 0.88 per token. Its third token's step carries a draft of the text's third token; when the sample agrees,
    the fourth token comes from the draft's row, and its frequencies must follow the model's own distribution
    after the prompt and the text's first three tokens."""
    model, tokenizer, _, prompt, recited, _ = reciter
    temperature, runs = 3.0, 400
    drafting = Engine(model, CONTEXT, max_draft=1)
    fourths = []
    for seed in range(runs):
        [out] = run(drafting, Request(tuple(prompt), 4, SamplingParams(temperature=temperature, seed=seed)))
        if [o.token for o in out[:3]] == recited[:3]:
            fourths.append(out[3].token)
    assert drafting.accepted_tokens >= len(fourths) > runs / 3
    rows = np.array([*prompt, *recited[:3]], np.int32)
    logits = model.forward(rows, [Segment(model.new_cache(CONTEXT), 0, len(rows))])[0]
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    counts = np.bincount(fourths, minlength=len(probs))
    likely = probs * len(fourths) >= 5  # bins expected to hold 5 or more; the rest pooled
    expected = np.append(probs[likely], probs[~likely].sum()) * len(fourths)
    observed = np.append(counts[likely], counts[~likely].sum())
    assert likely[recited[3]] and 0.8 < probs[recited[3]] < 0.95
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 16, (chi2, observed, expected)  # one degree of freedom: p < 1e-4 beyond


# ---- composition ----

def test_sequences_with_and_without_drafts_share_steps(reciter):
    model, tokenizer, _, prompt, recited, changed = reciter
    other = Request(tuple(int(t) for t in np.random.default_rng(1).integers(30, 250, 30)), 20, top_logprobs=1)
    requests = [recite(prompt, tokenizer), other, recite(changed, tokenizer), recite(prompt, tokenizer, 37)]
    alone = [run(Engine(model, CONTEXT), r)[0] for r in requests]
    drafting = Engine(model, CONTEXT, max_sequences=4, max_step_tokens=64, max_draft=16)
    together = run(drafting, *requests)
    assert together == alone
    assert len(together[3]) == 37 and together[3][-1].finish_reason == "length"  # drafts never pass max_tokens
    assert drafting.accepted_tokens > len(recited)


def test_a_grammar_checks_drafted_tokens(reciter):
    """The grammar allows the recital's first words and then one word the text does not have: drafts past that
    point are cut (the grammar rules them out) and the sequence writes what the grammar allows."""
    model, tokenizer, text, prompt, recited, _ = reciter
    words = text.split()
    lark = f'start: "{" ".join(words[:12])}" " changed" /[a-z ]*/'
    grammar = GrammarTokenizer(tokenizer).compile(lark)
    request = recite(prompt, tokenizer, 40, grammar=grammar)
    [plain] = run(Engine(model, CONTEXT), request)
    drafting = Engine(model, CONTEXT, max_draft=16)
    [drafted] = run(drafting, request)
    assert drafted == plain
    assert tokenizer.decode([o.token for o in plain]).startswith(" ".join(words[:12]) + " changed")
    assert drafting.accepted_tokens > 0


def test_a_cancelled_sequence_keeps_the_cold_runs_rows_for_reuse(reciter):
    """A sequence cancelled after drafted steps leaves its cache (rejected drafts' rows given back) to the
    prompt cache; the next turn reuses it and gets exactly what a cold run of the whole prompt gets."""
    model, tokenizer, _, _, recited, changed = reciter
    per_token = bytes_per_token(model.config)
    engine = Engine(model, CONTEXT, max_draft=16, prompt_cache=PromptCache(10**8, per_token))
    outputs: list[TokenOutput] = []
    sequence = engine.submit(recite(changed, tokenizer), outputs.append)
    while len(outputs) < 60:
        engine.step()
    engine.cancel(sequence)
    engine.step()
    assert engine.drafted_tokens > engine.accepted_tokens > 0
    follow_up = recite(changed + tuple(o.token for o in outputs) + tuple(tokenizer.encode(" more", add_bos=False)),
                       tokenizer, 30)
    warm_outputs: list[TokenOutput] = []
    warm = engine.submit(follow_up, warm_outputs.append)
    while engine.step():
        pass
    assert warm.reused >= len(changed) + 59
    assert warm_outputs == run(Engine(model, CONTEXT), follow_up)[0]


def test_replies_are_drafted_from_across_requests(reciter):
    """The store of recent replies: a prompt that does not quote the text, asked after a request whose reply
    was the recital, drafts it from that reply."""
    model, tokenizer, _, prompt, recited, _ = reciter
    engine = Engine(model, CONTEXT, max_draft=16)
    run(engine, recite(prompt, tokenizer))
    before = engine.accepted_tokens
    # The recital's first tokens, as a prompt of their own: the model goes on with the text.
    [out] = run(engine, recite(prompt[-2:] + recited[:5], tokenizer))
    assert [o.token for o in out] == recited[5:]
    assert engine.accepted_tokens - before > len(recited) / 2


# ---- the drafter ----

def test_the_longest_match_wins_and_the_query_itself_is_never_one():
    index = TokenIndex([1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 1, 2, 3])
    assert index.continuation([5, 1, 2, 3], 3) == (3, [9, 9, 5])  # "1 2 3" beats the later "2 3"
    assert index.continuation([8, 2, 3], 2) == (2, [7, 7])  # equal lengths: the most recent place
    assert index.continuation([4, 4], 3) == (0, [])
    assert TokenIndex([1, 2]).continuation([1, 2], 3) == (0, [])  # only the query's own end


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.integers(1, 8))
def test_a_draft_follows_an_earlier_place_that_ends_as_the_sequence_does(tokens, limit):
    length, draft = TokenIndex(tokens).continuation(tokens, limit)
    if not draft:
        return
    places = [i for i in range(MIN_MATCH - 1, len(tokens) - 1)
              if tokens[i - MIN_MATCH + 1: i + 1] == tokens[-MIN_MATCH:] and tokens[i + 1: i + 1 + len(draft)] == draft]
    assert places and length >= MIN_MATCH and len(draft) <= limit
    assert any(tokens[max(0, i - length + 1): i + 1] == tokens[-length:] for i in places)


def test_draft_length_grows_while_right_and_waits_after_misses():
    drafter = Drafter([1, 2, 3, 4] * 20, None, max_draft=8)
    history = [1, 2, 3, 4] * 20
    limits = []
    for _ in range(5):
        draft = drafter.propose(history, 100)
        limits.append(len(draft))
        drafter.verified(len(draft), len(draft))
    assert limits == [1, 2, 4, 8, 8]
    drafter.verified(8, 3)
    assert len(drafter.propose(history, 100)) == 3
    drafter.verified(3, 0)  # rejected outright: one step without drafts
    assert drafter.propose(history, 100) == [] and len(drafter.propose(history, 100)) == 1
    drafter.verified(1, 0)  # again: three steps without
    assert [len(drafter.propose(history, 100)) for _ in range(4)] == [0, 0, 0, 1]
    assert drafter.propose(history, 0) == []


def test_the_store_keeps_its_newest_replies_within_its_capacity():
    store = DraftStore(capacity=40)
    for first in range(0, 100, 10):
        store.add(list(range(first, first + 9)))
    assert len(store.index.tokens) <= 40
    assert store.index.continuation([91, 92], 3) == (2, [93, 94, 95])
    assert store.index.continuation([1, 2], 3) == (0, [])  # dropped
    assert store.index.continuation([97, 98], 3) == (0, [])  # nothing after a reply's end


def test_speculate_option():
    assert parse_speculate("off", True) == 0 and parse_speculate("5", False) == 5
    assert parse_speculate("auto", True) > parse_speculate("auto", False) > 0
    with pytest.raises(ValueError, match="auto, off or a number"):
        parse_speculate("-3", False)


# ---- the command line ----

def test_generate_drafts_by_default_and_says_so(reciter_file):
    path, tokenizer, _, prompt, recited = reciter_file

    def generate(*extra: str) -> dict:
        out = subprocess.run(cli("generate", str(path), "--prompt", tokenizer.decode(prompt), "--max-tokens", "300",
                                 "--json", *extra), capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    drafted, plain = generate(), generate("--speculate", "off")
    assert drafted["tokens"] == plain["tokens"] == recited
    assert drafted["accepted_tokens"] > len(recited) / 2 and plain["drafted_tokens"] == 0
    refused = subprocess.run(cli("generate", str(path), "--prompt", "x", "--speculate", "many"), capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "--speculate: auto, off or a number of tokens, not 'many'" in refused.stderr


# ---- the server ----

def test_metrics_and_the_access_line_count_drafts(reciter):
    model, tokenizer, _, prompt, recited, _ = reciter
    lines: list[str] = []
    server = start_server(model, tokenizer, access_log=lines.append, context=CONTEXT, max_draft=16)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        stop = tokenizer.decode(recited[30:33])
        reply = client.completions.create(model="m", prompt=list(prompt), max_tokens=300, temperature=0, stop=[stop])
        assert reply.choices[0].text == tokenizer.decode(recited)[:tokenizer.decode(recited).index(stop)]
        assert reply.choices[0].finish_reason == "stop"
        metrics = httpx.get(f"{server.url}/metrics").text
        drafted = float(re.search(r"^kimi_drafted_tokens_total (\S+)$", metrics, re.M)[1])
        accepted = float(re.search(r"^kimi_accepted_tokens_total (\S+)$", metrics, re.M)[1])
        rate = float(re.search(r"^kimi_draft_acceptance_rate (\S+)$", metrics, re.M)[1])
        assert drafted >= accepted > 10 and rate == pytest.approx(accepted / drafted)
        assert re.search(r"\d+/\d+ drafted tokens accepted", lines[-1])
    finally:
        stop_server(server)


@pytest.mark.slow
def test_a_recital_on_two_workers_survives_a_killed_worker(reciter_file):
    """`serve --workers 2` (drafts by default): a worker is killed mid-recital; the head covers its experts and
    the stream goes on with several tokens per step, to the recital's end."""
    path, tokenizer, _, prompt, recited = reciter_file
    process = start(cli("serve", str(path), "--workers", "2", "--port", "0", "--threads", "1", "--deterministic"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "KIMI_API_KEY": ""})
    try:
        url = ready_url(process)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="m", prompt=list(prompt), max_tokens=300, temperature=0, stream=True)
        text, killed = "", False
        for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            if len(text) > 40 and not killed:
                os.kill(expert_worker_pids()[0], signal.SIGKILL)
                wait_for_health(url, "degraded", timeout_s=60)
                killed = True
        assert killed and text == tokenizer.decode(recited[:-1])  # the end-of-turn token is not text
        samples = metric_samples(url)
        assert samples[("kimi_accepted_tokens_total", None)] > len(recited) / 2
        assert samples[("kimi_fallback_expert_activations_total", None)] > 0
    finally:
        stop(process)
