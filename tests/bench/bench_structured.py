"""Constrained decoding's cost over Kimi's real vocabulary (163,840 tokens), beside llama.cpp's grammar sampler.

    python tests/bench/bench_structured.py [--streams N] [--steps S]

1. Per token of a JSON answer to a schema: the time to rule out what the grammar forbids, ours (llguidance's
   mask, applied to a logits row) against llama.cpp's (its grammar sampler on a candidate array, llama-cpp-python
   in a subprocess, the grammar from its own JSON-schema converter), both on the sparse replica's vocabulary,
   following the same tokens.
2. In the engine (the tiny model, N streams decoding): ms per step with no constrained sequence, with one, and
   with all of them constrained; the mask is computed while the model runs the step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.engine import Engine, Request  # noqa: E402
from runtime.ggml_ops import GgmlRunner  # noqa: E402
from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.grammar import GrammarTokenizer  # noqa: E402
from runtime.model import KimiModel  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from runtime.synthetic.demo_model import make_model  # noqa: E402
from runtime.synthetic.replica_model import write_sparse_replica  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}}}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "color": "blue", "tags": ["math", "engines", "poetry"], "ok": true}'
REASONING = "The user wants a person. Ada Lovelace wrote the first program, for Babbage's engine, in 1843.\n"
LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}

LLAMA_SCRIPT = """
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
from llama_cpp.llama_grammar import json_schema_to_gbnf
args = json.loads(sys.stdin.read())
llm = L.Llama(model_path=args["model"], vocab_only=True, verbose=False)
vocab = L.llama_model_get_vocab(llm.model)
tokens = llm.tokenize(args["answer"].encode(), add_bos=False, special=False)
grammar = L.llama_sampler_init_grammar(vocab, json_schema_to_gbnf(json.dumps(args["schema"])).encode(), b"root")
n = L.llama_vocab_n_tokens(vocab)
entry = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
candidates = np.zeros(n, entry)
logits = np.random.default_rng(0).standard_normal(n).astype(np.float32)
times, fills = [], []
for token in tokens:
    started = time.perf_counter()
    candidates["id"] = np.arange(n)
    candidates["logit"] = logits
    candidates["p"] = 0
    filled = time.perf_counter()
    array = L.llama_token_data_array(candidates.ctypes.data_as(L.llama_token_data_p), n, -1, False)
    L.llama_sampler_apply(grammar, ctypes.byref(array))
    assert candidates["logit"][token] > -np.inf, token
    times.append(time.perf_counter() - filled)
    fills.append(filled - started)
    L.llama_sampler_accept(grammar, token)
print(json.dumps({"tokens": len(tokens), "ms": 1000 * float(np.median(times)), "fill": 1000 * float(np.median(fills))}))
"""


def our_mask_ms(grammars: GrammarTokenizer, tokenizer: Tokenizer, lark: str, text: str) -> tuple[float, int]:
    """(median ms per token to mask a row, tokens) along `text` in the grammar."""
    matcher = grammars.compile(lark).matcher()
    logits = np.random.default_rng(0).standard_normal(tokenizer.vocab_size).astype(np.float32)
    tokens = tokenizer.encode(text, parse_special=False, add_bos=False)
    times = []
    for token in tokens:
        row = logits.copy()
        started = time.perf_counter()
        matcher.apply(row)
        times.append(time.perf_counter() - started)
        assert row[token] > -np.inf, token
        matcher.accept(token)
    return 1000 * float(np.median(times)), len(tokens)


def engine_step_ms(model: KimiModel, tokenizer: Tokenizer, streams: int, constrained: int, steps: int) -> float:
    """Median ms per decode step with `streams` sequences, the first `constrained` of them held to a schema
    whose strings never end (so that every step is constrained)."""
    grammar = GrammarTokenizer(tokenizer).compile('start: "[" TEXT\nTEXT: /[a-z ]*/')
    prompt = tuple(tokenizer.encode("The answer:", parse_special=False))
    engine = Engine(model, 1024, max_sequences=streams)
    for i in range(streams):
        engine.submit(Request(prompt, steps + 5, SamplingParams(temperature=1, seed=i), frozenset(),
                              grammar=grammar if i < constrained else None), lambda output: None)
    engine.step()  # the prompts
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        parts = write_sparse_replica(Path(folder) / "replica.gguf")
        tokenizer = Tokenizer.from_metadata(GGUFModelFile(parts[0]).metadata)
        started = time.perf_counter()
        grammars = GrammarTokenizer(tokenizer)
        built = 1000 * (time.perf_counter() - started)
        ours, tokens = our_mask_ms(grammars, tokenizer, "start: %json " + json.dumps({**SCHEMA, "x-guidance": LAYOUT}),
                                   ANSWER)
        free, _ = our_mask_ms(grammars, tokenizer, "start: TEXT\nTEXT: /(.|\\n)*/", REASONING)
        llama = json.loads(subprocess.run(
            [sys.executable, "-c", LLAMA_SCRIPT], capture_output=True, text=True, check=True,
            input=json.dumps({"model": str(parts[0]), "schema": SCHEMA, "answer": ANSWER})).stdout)
    print(f"vocabulary {tokenizer.vocab_size}: a JSON answer of {tokens} tokens (llama.cpp's tokens: {llama['tokens']})")
    print(f"  grammar vocabulary built once per model: {built:.0f} ms")
    print(f"  mask per token, median: ours {ours:.2f} ms, llama.cpp's grammar sampler {llama['ms']:.2f} ms "
          f"({llama['ms'] / ours:.1f}x ours; its candidate array's fill, {llama['fill']:.2f} ms, not counted)")
    print(f"  mask per token in free text (reasoning before a schema's answer: nearly every token allowed): "
          f"ours {free:.2f} ms")
    with tempfile.TemporaryDirectory() as folder:
        path = make_model(Path(folder) / "tiny.gguf", "tiny", "Q4_K_M")
        model_file = GGUFModelFile(path)
        model = KimiModel(model_file, GgmlRunner(2), repack="none")
        tokenizer = Tokenizer.from_metadata(model_file.metadata)
        print(f"engine, tiny model ({tokenizer.vocab_size} tokens), {args.streams} streams decoding, median ms per step:")
        engine_step_ms(model, tokenizer, args.streams, 0, args.steps)  # warm up
        for constrained in (0, 1, args.streams):
            runs = [engine_step_ms(model, tokenizer, args.streams, constrained, args.steps) for _ in range(3)]
            print(f"  {constrained} constrained: {min(runs):.2f} ms (best of 3 runs)")


if __name__ == "__main__":
    main()
