"""`kimi-cluster generate`: one prompt, one answer, printed as it comes (or as JSON)."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from cluster.cli.model_session import model_session
from cluster.cli.options import add_cluster_args, add_runtime_args, add_sampling_args, cluster_config, sampling_params
from runtime.speculative import parse_speculate


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate from a GGUF model (first file of a split set is enough).")
    p.add_argument("model", help="path to the .gguf file (or its -00001-of-0000N.gguf part)")
    p.add_argument("--prompt", required=True, help="the prompt text; special tokens like <|im_user|> are parsed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text; prompt_tokens and completion_tokens (counts, as in OpenAI's "
                        "usage); prompt_token_ids and tokens (the ids); time_to_first_token_s (the prompt's prefill); "
                        "tokens_per_s (decode speed over the tokens after the first); prompt_tokens_per_s; "
                        "drafted_tokens, accepted_tokens; finish_reason")
    p.add_argument("--logits-out", metavar="FILE.npy",
                   help="save the float32 logits of the last prompt position")
    add_sampling_args(p)
    add_runtime_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_generate)


def _prompt_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    # As llama.cpp does for a raw prompt: special tokens parsed, BOS only if the file asks for it.
    return tokenizer.encode(text, parse_special=True)


def cmd_generate(args) -> None:
    params = sampling_params(args)
    config = cluster_config(args)
    if config is not None:  # one sequence: the head plans a KV cache for one, not for a server's batch
        config = dataclasses.replace(config, max_sequences=1)
    with model_session(args, config, max_sequences=1) as (model, tokenizer, cluster, kv):
        _generate(args, params, model, tokenizer, kv.context, parse_speculate(args.speculate, cluster is not None))


def _generate(args, params, model, tokenizer, context: int, max_draft: int) -> None:
    from runtime.engine import Engine, GenerationStats
    prompt = _prompt_tokens(tokenizer, args.prompt, args.chat)
    engine = Engine(model, context_size=context, max_draft=max_draft)
    stats = GenerationStats()
    decoder = tokenizer.stream_decoder() if not args.json else None
    tokens = []
    for token in engine.generate(prompt, args.max_tokens, params, frozenset(tokenizer.eog_ids), stats):
        tokens.append(token)
        if decoder is not None and token not in tokenizer.eog_ids:
            print(decoder.add(token), end="", flush=True)
    if args.logits_out:
        np.save(args.logits_out, stats.prompt_logits.astype(np.float32))
    text = tokenizer.decode([t for t in tokens if t not in tokenizer.eog_ids])
    if args.json:
        print(json.dumps({"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                          "prompt_token_ids": prompt, "tokens": tokens, "text": text,
                          "time_to_first_token_s": round(stats.prompt_seconds, 4),
                          "tokens_per_s": round(stats.decode_tokens_per_s, 3),
                          "prompt_tokens_per_s": round(stats.prompt_tokens_per_s, 3),
                          "drafted_tokens": engine.drafted_tokens, "accepted_tokens": engine.accepted_tokens,
                          "finish_reason": stats.finish_reason}))
        return
    print(decoder.flush())
    print(f"[prompt: {stats.prompt_tokens} tokens at {stats.prompt_tokens_per_s:.1f} tokens/s, first token after "
          f"{stats.prompt_seconds:.2f} s; generated: {stats.generated_tokens} tokens, decoding at "
          f"{stats.decode_tokens_per_s:.1f} tokens/s after the first"
          f"{_drafts(engine)}; "
          f"finish: {stats.finish_reason}]", file=sys.stderr)


def _drafts(engine) -> str:
    """How many drafted tokens were right, if any were drafted."""
    if not engine.drafted_tokens:
        return ""
    return f", {engine.accepted_tokens}/{engine.drafted_tokens} drafted tokens accepted"
