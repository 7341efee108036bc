"""A model in the Kimi layout whose weights make it write given token sequences, greedily: tests of what a
server does with a model's own tokens (tool calls, reasoning) need a model that really writes them.

Each script is a token sequence; wherever its two last tokens so far are (a, b), the model writes the token
that follows them in the script. Its state is that pair, the bigram, built from the weights alone:
- an embedding is a random unit vector in the first half of the residual stream, plus one constant
  coordinate that every token shares;
- layer 0's attention looks at the previous position only. Its query and key come from the constant
  coordinate through RoPE's five fastest rotations (left alone by YaRN), set so that the score peaks at
  a distance of one. Its values copy the previous token's vector into the second half of the stream;
- every other branch adds nothing (zero output projections and experts);
- the output matrix is the least-squares solution that gives each script bigram's state a high logit for
  its next token and zero for all others.

Scripts must agree: one bigram, one next token. A script's text parts are spelled with whichever tokens of
the vocabulary keep them agreeing (not necessarily the tokenizer's own split: "functions.get_weather" and
"functions.get_time" would otherwise both write "_" after ".get" and then disagree). Unscripted bigrams
give arbitrary tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGUFWriter

from ..tokenizer import Tokenizer
from .demo_model import ARCH, Preset, tensor_specs, write_metadata
from .demo_vocab import add_tokenizer_to, demo_tokenizer_metadata

# One head with a latent just wide enough for a token's vector: attention's cost grows with heads x latent width
# at every position of the context, and coding agents' prompts run to 60K tokens.
SCRIPTED = Preset(n_embd=256, num_layers=2, num_dense_layers=1, num_heads=1, q_lora_rank=256, kv_lora_rank=128,
                  head_dim_nope=64, rope_dim=32, head_dim_v=128, n_ff_dense=256, n_ff_expert=256, num_experts=4,
                  num_experts_used=2, base_dtype="f32")
# A model that recites a ~300-token text (up to 511 bigrams) at Kimi K2's depth and expert counts (61 layers,
# 384 experts, 8 used; experts 32 wide, as the k2-depth demo preset): drafts from the prompt have something to
# copy, and a step costs what K2's layer count makes it cost.
RECITER = Preset(n_embd=512, num_layers=61, num_dense_layers=1, num_heads=1, q_lora_rank=256, kv_lora_rank=256,
                 head_dim_nope=64, rope_dim=32, head_dim_v=256, n_ff_dense=256, n_ff_expert=32, num_experts=384,
                 num_experts_used=8, base_dtype="f16")
RECITE_ASK = "Repeat this text exactly:\n\n"
# The stream's first half holds the token's own vector (its last dim: the constant), the second the previous
# token's; the latent (one head) carries the token's vector: n_embd = 2 * kv_lora_rank = 2 * head_dim_v.
ROPE_PAIRS = 5  # RoPE's fastest rotations, which YaRN leaves as they are (wavelength < 128 positions)
ROPE_BASE = 50000.0  # write_metadata's rope.freq_base
ROPE_AMPLITUDE = 40.0  # per pair, for query and key: the previous position wins by e^30 or more
LOGIT = 30.0


class ScriptConflict(ValueError):
    """Two scripts ask for different tokens after the same two tokens."""


def next_tokens(scripts: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """(a, b) -> the token after them, over every script; refused when two disagree."""
    table: dict[tuple[int, int], int] = {}
    for script in scripts:
        for a, b, c in zip(script, script[1:], script[2:]):
            if table.setdefault((a, b), c) != c:
                raise ScriptConflict(f"after tokens ({a}, {b}) one script writes {table[a, b]} and another {c}; "
                                     "the model can only follow the last two tokens")
    return table


def spell(scripts: Sequence[Sequence[int | str]], tokenizer: Tokenizer) -> list[list[int]]:
    """Scripts of token ids and texts -> token ids, each text spelled so that all scripts agree (a search,
    longest tokens first, back over a script's earlier texts when a later part cannot follow). A script's
    first two items are ids: the prompt's last two tokens."""
    pieces: dict[int, list[tuple[bytes, int]]] = {}  # first byte -> (bytes, id), longest first
    for token in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token)
        if raw and token not in tokenizer.special_ids:
            pieces.setdefault(raw[0], []).append((raw, token))
    for options in pieces.values():
        options.sort(key=lambda option: -len(option[0]))
    table: dict[tuple[int, int], int] = {}
    return [_spell_script(script, table, pieces) for script in scripts]


def _spell_script(script: Sequence[int | str], table: dict, pieces: dict) -> list[int]:
    """One script's tokens, agreeing with `table` (which it then joins) and with itself. Each text is spelled
    together with the ids that follow it (its spelling decides what they follow); earlier texts stay."""
    written = list(script[:2])
    parts = list(script[2:])
    while parts:
        text = parts.pop(0) if isinstance(parts[0], str) else ""
        ids = []
        while parts and isinstance(parts[0], int):
            ids.append(parts.pop(0))
        spelled = _spell_text(written, text.encode(), ids, table, pieces)
        if spelled is None:
            raise ScriptConflict(f"no spelling of {text!r} followed by {ids} agrees with the scripts so far")
        written = spelled
    return written


def _spell_text(written: list[int], text: bytes, ids: list[int], table: dict, pieces: dict) -> list[int] | None:
    """`written`, then `text` spelled and `ids`, every new bigram agreeing with `table` (updated on success)."""
    def agrees(tokens: list[int], start: int) -> dict | None:
        """The new bigrams of tokens[start:], or None if one disagrees with `table` or with another."""
        new: dict = {}
        for i in range(max(start, 2), len(tokens)):
            key = (tokens[i - 2], tokens[i - 1])
            if table.get(key, new.get(key, tokens[i])) != tokens[i]:
                return None
            new[key] = tokens[i]
        return new

    def search(at: int, tokens: list[int]) -> list[int] | None:
        if at == len(text):
            return tokens + ids if agrees(tokens + ids, len(written)) is not None else None
        for raw, token in pieces.get(text[at], ()):
            if text.startswith(raw, at) and agrees(tokens + [token], len(written)) is not None:
                found = search(at + len(raw), tokens + [token])
                if found is not None:
                    return found
        return None
    found = search(0, list(written))
    if found is not None:
        table.update(agrees(found, len(written)))
    return found


def _token_dims(p: Preset) -> int:
    """Dims 0..token_dims-1: the token's own vector; token_dims: the constant."""
    return p.kv_lora_rank - 1


def _embeddings(p: Preset, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """Every row the same length, so that RMSNorm scales every token's constant coordinate alike."""
    dims = _token_dims(p)
    token = rng.standard_normal((vocab_size, dims)).astype(np.float32)
    token *= np.sqrt(dims) / np.linalg.norm(token, axis=1, keepdims=True)
    table = np.zeros((vocab_size, p.n_embd), np.float32)
    table[:, :dims] = token
    table[:, dims] = np.sqrt(dims)
    return table


def _rms_norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _weights(p: Preset, vocab_size: int, table: dict[tuple[int, int], int], rng: np.random.Generator
             ) -> dict[str, np.ndarray]:
    """The tensors that are not zero (norms are ones; every other branch adds nothing, a zero tensor)."""
    d, dims, q_b = p.n_embd, _token_dims(p), "blk.0.attn_q_b.weight"
    embeddings = _embeddings(p, vocab_size, rng)
    constant = _rms_norm(embeddings[0])[dims]  # the constant coordinate after attn_norm, the same for all
    shapes = {name: shape for name, shape, _ in tensor_specs(p, vocab_size)}
    w = {name: np.ones(shape, np.float32) for name, shape in shapes.items() if name.endswith("norm.weight")}
    w.update({name: np.zeros(shapes[name], np.float32) for name in (
        "blk.0.attn_q_a.weight", q_b, "blk.0.attn_kv_a_mqa.weight", "blk.0.attn_v_b.weight",
        "blk.0.attn_output.weight")})
    w["token_embd.weight"] = embeddings
    # Query: q_a reads the constant into a vector of ones (q_a_norm keeps it), q_b turns it into each head's
    # RoPE part, rotated back by one position's angle; the no-RoPE part stays zero.
    w["blk.0.attn_q_a.weight"][:, dims] = 1 / constant
    angles = ROPE_BASE ** (-2 * np.arange(ROPE_PAIRS) / p.rope_dim)
    head_rows = p.head_dim_nope + p.rope_dim
    for head in range(p.num_heads):
        rope_row = head * head_rows + p.head_dim_nope
        w[q_b][rope_row: rope_row + 2 * ROPE_PAIRS: 2, 0] = ROPE_AMPLITUDE * np.cos(angles)
        w[q_b][rope_row + 1: rope_row + 2 * ROPE_PAIRS: 2, 0] = -ROPE_AMPLITUDE * np.sin(angles)
    # Key: the same constant, unrotated; latent (the values): the token's own vector.
    kv = w["blk.0.attn_kv_a_mqa.weight"]
    kv[np.arange(dims), np.arange(dims)] = 1
    kv[p.kv_lora_rank: p.kv_lora_rank + 2 * ROPE_PAIRS: 2, dims] = ROPE_AMPLITUDE / constant
    # Values to the stream's second half: head h carries its share of the latent's dims.
    per_head = p.kv_lora_rank // p.num_heads
    for head in range(p.num_heads):
        for k in range(per_head):
            dim = head * per_head + k
            if dim < dims:
                w["blk.0.attn_v_b.weight"][head, k, dim] = 1
                w["blk.0.attn_output.weight"][d // 2 + dim, head * p.head_dim_v + k] = 1
    w["output.weight"] = _output(p, embeddings, table, vocab_size)
    return w


def _state(p: Preset, embeddings: np.ndarray, previous: int, current: int) -> np.ndarray:
    """The final hidden state at `current` after `previous`: its vector and the previous one's, normalized."""
    dims = _token_dims(p)
    latent = _rms_norm(np.pad(_rms_norm(embeddings[previous])[:dims], (0, p.kv_lora_rank - dims)))
    stream = embeddings[current].copy()
    stream[p.n_embd // 2: p.n_embd // 2 + dims] += latent[:dims]
    return _rms_norm(stream)


def _output(p: Preset, embeddings: np.ndarray, table: dict[tuple[int, int], int], vocab_size: int) -> np.ndarray:
    states = np.stack([_state(p, embeddings, a, b) for a, b in table])  # [N, D]
    targets = np.zeros((len(table), vocab_size), np.float32)
    targets[np.arange(len(table)), list(table.values())] = LOGIT
    solution, *_ = np.linalg.lstsq(states, targets, rcond=None)  # states @ solution = targets
    return solution.T.astype(np.float32)


def write_scripted_model(path: str | Path, scripts: Sequence[Sequence[int]], seed: int = 0,
                         chat_template: str = "instruct", preset: Preset = SCRIPTED) -> Path:
    """Write a model that writes `scripts` (token sequences of the demo vocabulary, see `spell`) greedily.
    Routers are random, so that tokens spread over the experts as in a trained model (which add nothing);
    matrices are stored as the preset's base_dtype says."""
    if preset.n_embd != 2 * preset.kv_lora_rank or preset.num_heads * preset.head_dim_v != preset.kv_lora_rank:
        raise ValueError("a scripted model needs n_embd = 2 * kv_lora_rank = 2 * num_heads * head_dim_v")
    table = next_tokens(scripts)
    if len(table) > preset.n_embd - 1:
        raise ValueError(f"{len(table)} scripted bigrams are more than a {preset.n_embd}-wide state can tell "
                         "apart; shorten the scripts")
    tokenizer = demo_tokenizer_metadata(chat_template)
    vocab_size = len(tokenizer["tokenizer.ggml.tokens"])
    path = Path(path)
    writer = GGUFWriter(path, ARCH)
    write_metadata(writer, preset, vocab_size, name="Kimi-K2 scripted")
    add_tokenizer_to(writer, tokenizer)
    weights = _weights(preset, vocab_size, table, np.random.default_rng(seed))
    routers = np.random.default_rng(seed + 1)
    for name, shape, fan_in in tensor_specs(preset, vocab_size):
        if name.endswith("ffn_gate_inp.weight"):
            array = routers.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        else:
            array = weights.get(name)
            if array is None:  # zeros from calloc: untouched pages cost no memory while the file is written
                array = np.zeros(shape, np.float32 if fan_in is None or preset.base_dtype == "f32" else np.float16)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def recitable(tokenizer: Tokenizer, max_tokens: int, source: str | None = None) -> str:
    """A text of `source`'s words (default: the vocabulary's whole-word tokens), each word once, in order, up to
    `max_tokens` tokens, that a model which follows its last two tokens can recite in the tokenizer's own
    spelling (no pair of tokens in it is followed by two different ones): the text a reciting model is given."""
    if source is None:
        pieces = (tokenizer.token_bytes(i).decode("utf-8", "replace") for i in range(tokenizer.vocab_size))
        source = " ".join(piece[1:] for piece in pieces if piece[:1] == " " and piece[1:].isalpha() and len(piece) > 3)
    kept, seen = [], set()
    for word in source.split():
        if word.lower() in seen:
            continue
        tokens = tokenizer.encode(" ".join(kept + [word]), parse_special=False, add_bos=False)
        if len(tokens) > max_tokens:
            break
        try:
            next_tokens([tokens])
        except ScriptConflict:
            continue
        kept.append(word)
        seen.add(word.lower())
    return " ".join(kept)


def recital_prompt(text: str, tokenizer: Tokenizer) -> list[int]:
    """A chat prompt that asks for `text` word for word, quoting it."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": RECITE_ASK + text}]),
                            parse_special=True)


def recital(text: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt, script) of a model that recites `text` (see `recitable`): the prompt asks for it (recital_prompt),
    and the script writes the text's tokens, as the prompt spells them, and the end of its turn."""
    prompt = recital_prompt(text, tokenizer)
    quoted = tokenizer.encode(text, parse_special=False, add_bos=False)
    if not any(prompt[i: i + len(quoted)] == quoted for i in range(len(prompt) - len(quoted) + 1)):
        raise ValueError("the prompt spells the text with other tokens than the text alone; start it with a word")
    end_of_turn = tokenizer.encode("<|im_end|>", parse_special=True, add_bos=False)
    script = [*prompt[-2:], *quoted, *end_of_turn]
    next_tokens([script])  # a ScriptConflict if the text cannot be recited
    return prompt, script
