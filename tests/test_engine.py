"""Continuous batching: sequences that share steps get exactly the tokens they get alone; queueing,
cancelling, failures and log-probabilities."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.kv_cache import Segment
from runtime.engine import Engine, EngineFull, Request, SequenceFailed, TokenOutput
from runtime.experts import LocalExperts
from runtime.ggml_ops import GgmlRunner, RepackedWeight
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(make_tiny):
    # Plain kernels: rows never influence each other (see runtime/engine.py).
    return KimiModel(GGUFModelFile(make_tiny("Q4_K_M")), GgmlRunner(2), repack="none")


def requests(count: int, prompts_seed: int = 0, **params) -> list[Request]:
    rng = np.random.default_rng(prompts_seed)
    return [Request(tuple(int(t) for t in rng.integers(30, 250, rng.integers(1, 40))), int(rng.integers(1, 12)),
                    SamplingParams(**params)) for _ in range(count)]


def solo(model, request: Request) -> list[int]:
    return list(Engine(model, context_size=256).generate(request.prompt, request.max_tokens, request.params))


def run_together(engine: Engine, batch: list[Request]) -> list[list[TokenOutput]]:
    outputs: list[list[TokenOutput]] = [[] for _ in batch]
    for request, sink in zip(batch, outputs):
        engine.submit(request, sink.append)
    while engine.step():
        pass
    return outputs


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}])
def test_batched_sequences_equal_their_solo_runs(model, params):
    batch = requests(7, **params)
    # Small steps and few slots: prompts are split over several steps, and requests wait for a slot.
    engine = Engine(model, context_size=256, max_sequences=3, max_step_tokens=8)
    steps = []
    engine.on_step = lambda rows, seconds: steps.append(rows)
    outputs = run_together(engine, batch)
    for request, got in zip(batch, outputs):
        assert [o.token for o in got] == solo(model, request)
        assert got[-1].finish_reason == "length" and all(o.finish_reason is None for o in got[:-1])
    assert max(steps) <= 8 and len(steps) > sum(len(r.prompt) for r in batch) / 8
    assert not engine.busy


def test_stop_token_ends_a_sequence_early(model):
    request = requests(1, prompts_seed=3)[0]
    expected = solo(model, request)
    stop = Request(request.prompt, request.max_tokens, stop_tokens=frozenset({expected[1]}))
    got = run_together(Engine(model, context_size=256), [stop])[0]
    assert [o.token for o in got] == expected[:expected.index(expected[1]) + 1]
    assert got[-1].finish_reason == "stop"


def test_cancel_frees_the_sequence_and_the_others_go_on(model):
    batch = requests(3, prompts_seed=1)
    batch[0] = Request(batch[0].prompt, 11)
    engine = Engine(model, context_size=256)
    outputs = [[] for _ in batch]
    sequences = [engine.submit(r, sink.append) for r, sink in zip(batch, outputs)]
    engine.step()
    engine.step()
    engine.cancel(sequences[0])
    while engine.step():
        assert sequences[0] not in engine.running
    assert len(outputs[0]) == 2 and outputs[0][-1].finish_reason is None
    for request, got in zip(batch[1:], outputs[1:]):
        assert [o.token for o in got] == solo(model, request)


def test_full_queue_is_refused(model):
    engine = Engine(model, context_size=256, max_sequences=1, max_waiting=2)
    for request in requests(2):
        engine.submit(request, lambda output: None)
    with pytest.raises(EngineFull, match="already waiting"):
        engine.submit(requests(1)[0], lambda output: None)


@pytest.mark.parametrize("request_, message", [
    (Request((), 4), "prompt is empty"),
    (Request((1, 2), 0), "max_tokens must be at least 1"),
    (Request(tuple(range(250)), 10), r"exceeds the context size 256"),
    (Request((1, 10**6), 3), "token ids must lie in"),
])
def test_impossible_requests_are_refused(model, request_, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, context_size=256).submit(request_, lambda output: None)


class FailingOnce:
    """Experts that fail at their first call (as a dead worker does), then work."""

    def __init__(self, inner):
        self.inner, self.failed = inner, False

    def start(self, layer, hidden, ids, weights):
        if not self.failed:
            self.failed = True
            raise RuntimeError("node w1 failed: UNAVAILABLE")
        return self.inner.start(layer, hidden, ids, weights)

    def graph_weights(self, layer, slots):
        return None  # like remote experts: the model's graph stops at the router


def test_a_failed_step_fails_its_sequences_and_the_engine_serves_on(model):
    experts = FailingOnce(LocalExperts(model.file, model.runner, model.config.moe_layers, model.config.num_experts))
    failing = KimiModel(model.file, model.runner, experts=experts, repack="none")
    engine = Engine(failing, context_size=256)
    batch = requests(2, prompts_seed=5)
    outputs = run_together(engine, batch)
    assert all(len(o) == 1 and isinstance(o[0], SequenceFailed) and "node w1" in str(o[0]) for o in outputs)
    again = run_together(engine, batch)
    assert [[o.token for o in got] for got in again] == [solo(model, r) for r in batch]


class NaNLogitsOnce(KimiModel):
    """A model whose first step gives NaN logits for its first sequence. (NaN inside the network would not
    reach the logits: ggml's 8-bit activation rounding turns it into numbers.)"""

    poisoned = False

    def forward(self, tokens, segments, all_logits=False):
        logits = super().forward(tokens, segments, all_logits)
        if not self.poisoned:
            self.poisoned, logits[0] = True, np.nan
        return logits


def test_a_sequence_that_cannot_be_sampled_fails_alone(model):
    engine = Engine(NaNLogitsOnce(model.file, model.runner, repack="none"), context_size=256)
    batch = requests(3, prompts_seed=6)
    outputs = run_together(engine, batch)
    assert len(outputs[0]) == 1 and "NaN" in str(outputs[0][0])
    assert [[o.token for o in got] for got in outputs[1:]] == [solo(model, r) for r in batch[1:]]


def test_logprobs_are_the_models_log_softmax(model):
    request = Request(requests(1, prompts_seed=2)[0].prompt, 3, top_logprobs=4)
    engine = Engine(model, context_size=256)
    outputs = []
    sequence = engine.submit(request, outputs.append)
    engine.step()
    logits = sequence.last_logits.astype(np.float64)
    expected = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    first = outputs[0]
    # The normaliser's exponentials are float32 (as llama.cpp's), summed in float64.
    assert first.logprob == pytest.approx(expected[first.token], abs=1e-6)
    assert [t for t, _ in first.top_logprobs] == list(np.argsort(-expected, kind="stable")[:4])
    assert first.top_logprobs[0][0] == first.token  # greedy picks the best
    assert [v for _, v in first.top_logprobs] == pytest.approx(np.sort(expected)[::-1][:4].tolist(), abs=1e-6)


def test_background_loop_serves_submissions_from_threads(model):
    batch = requests(6, prompts_seed=9)
    engine = Engine(model, context_size=256, max_sequences=4)
    engine.start()
    done = [threading.Event() for _ in batch]
    outputs = [[] for _ in batch]

    def sink(i):
        def on_output(output):
            outputs[i].append(output)
            if isinstance(output, SequenceFailed) or output.finish_reason:
                done[i].set()
        return on_output
    threads = [threading.Thread(target=engine.submit, args=(r, sink(i))) for i, r in enumerate(batch)]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in done)
    engine.stop()
    assert [[o.token for o in got] for got in outputs] == [solo(model, r) for r in batch]


@pytest.fixture(scope="module")
def model_with_interleaved_experts(model):
    interleaved = KimiModel(model.file, model.runner, repack="experts")
    # Most expert tensors get interleaved copies (the Q6_K ones have no interleaved kernel here).
    weights = [w for kinds in interleaved.experts.shard.tensors.values() for w in kinds.values()]
    assert sum(isinstance(w, RepackedWeight) for w in weights) >= len(weights) // 2
    return interleaved


def alone_and_together(model) -> tuple[list[np.ndarray], np.ndarray]:
    """Last-row logits of six prompts run one by one, and run as one step."""
    prompts = [np.asarray(r.prompt, np.int32) for r in requests(6, prompts_seed=4)]
    alone = [model.forward(p, [Segment(model.new_cache(64), 0, len(p))])[0] for p in prompts]
    starts = np.cumsum([0] + [len(p) for p in prompts])
    together = model.forward(np.concatenate(prompts), [Segment(model.new_cache(64), int(s), len(p))
                                                       for s, p in zip(starts, prompts)])
    return alone, together


@pytest.mark.parametrize("which", ["model", "model_with_interleaved_experts"])
def test_rows_of_different_sequences_never_mix(request, which):
    """The property batching rests on, bit for bit: a sequence's logits in a shared step equal its logits alone
    (what `serve --deterministic` runs)."""
    alone, together = alone_and_together(request.getfixturevalue(which))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_with_every_weight_interleaved_batching_changes_logits_only_by_rounding(model):
    """`serve`'s default (--repack all): rows share interleaved kernels, so batched logits may differ from solo
    ones, but no more than the parity tolerance against llama.cpp (1e-3 of the logit range)."""
    interleaved = KimiModel(model.file, model.runner, repack="all")
    assert isinstance(interleaved.weight("blk.0.attn_output.weight"), RepackedWeight)
    alone, together = alone_and_together(interleaved)
    for a, b in zip(alone, together):
        assert np.abs(a - b).max() <= 1e-3 * (a.max() - a.min())


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_a_running_stream(model):
    """A 16K-token prompt arrives while a sequence streams: each step carries one row of the stream beside a
    chunk of the prompt, so the stream waits no more than one chunk's time for any token."""
    engine = Engine(model, context_size=16_384, max_sequences=2, max_step_tokens=512)
    streamed: list[TokenOutput] = []
    engine.submit(Request(tuple(range(30, 40)), 100, SamplingParams()), streamed.append)
    engine.step()
    long_prompt = tuple(int(t) for t in np.random.default_rng(0).integers(30, 250, 16_000))
    arriving = engine.submit(Request(long_prompt, 1, SamplingParams()), lambda output: None)
    steps = 0
    while arriving.prefilling:
        before = len(streamed)
        assert engine.step() <= 512
        assert len(streamed) == before + 1, "the stream got no token in a step of the long prompt's prefill"
        steps += 1
    assert steps >= 16_000 // 512
