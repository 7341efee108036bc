"""Tokenizer == llama.cpp on the demo Kimi vocabulary: ids, pieces, end-of-generation set, chat prompts.

llama.cpp runs in a subprocess (tests/llama_oracle.py) on a vocab-only GGUF written here; each oracle
call covers the whole text set, so the module needs only a handful of subprocesses.
"""
from __future__ import annotations

import random
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jinja2
import pytest
from gguf import GGUFWriter

from runtime.synthetic.demo_vocab import (KIMI_K2_INSTRUCT_TEMPLATE, KIMI_K2_THINKING_TEMPLATE, SPECIAL_OFFSETS,
                                add_tokenizer_to, demo_tokenizer_metadata, kimi_tokenizer_metadata, train_bpe)
from runtime.tokenizer import Tokenizer
from tests import llama_oracle

# Checked without importing: libllama must only ever load inside the oracle subprocess.
needs_llama_cpp = pytest.mark.skipif(find_spec("llama_cpp") is None,
                                     reason="llama.cpp (pip install llama-cpp-python) is the oracle for this test")

METADATA = demo_tokenizer_metadata()
N_RANKS = METADATA["tokenizer.ggml.bos_token_id"]
FILLER = METADATA["tokenizer.ggml.tokens"][N_RANKS + 5]  # an UNUSED slot between Kimi's specials

TEXTS = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "contractions": "I'm sure they'll say it's fine, but we've—I'd—you're NOT done. DON'T! O'Neil's 'quoted'",
    "contraction_case": "ſ's Ǆ'LL x'S y'Re z'vE rock'n'roll",
    "code": "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn None\n\n\nclass A:\n    pass\n",
    "punctuation": "!!! ... ??? --> => ::: /* */ \"q\" (p) [b] {c} @#$%^&*_+=~`|\\ \n\n",
    "digits": "1234567890 3.14159 0007 1,000,000 +44 20 7946 0958 2025-01-31 12:30:45",
    "long_number": "123456789012345678901234567890",
    "unicode_digits": "١٢٣٤٥ ½ ①②③ Ⅻ ５６７",
    "cjk": "今天天气很好，我们一起去公园散步吧。人工智能正在改变我们的生活方式。",
    "cjk_latin": "我在用Python写一个tokenizer，它支持UTF-8编码和emoji😀。Kimi是月之暗面开发的模型，有1万亿参数。",
    "japanese_korean": "日本語のテキスト、カタカナ。한국어 문장입니다. 々〇⺀ 𠀀𪜀",
    "emoji": "Great job! 🎉🎉 👍 😀😃😄 ☀️ then 🌧️ ❤️❤️ 🔥",
    "emoji_zwj": "👨‍👩‍👧‍👦 👩‍❤️‍👨 🧑‍💻 🏳️‍🌈 🇯🇵🇺🇸🇨🇳 👋🏽 👍🏿",
    "whitespace": "a  b   c\t\td \u00a0 e\u3000f    \n\n\n   g   \u2028h\u0085i\u200bj  ",
    "crlf": "line one\r\nline two\r\n\r\n  line three\r\rfour\n\r",
    "camel_case": "CamelCase camelCase HTTPServer getElementById XMLHttpRequest iPhone McDonald's ABCdef",
    "combining_marks": "cafe\u0301 nai\u0308ve नमस्ते ภาษาไทย x\u20dd é",
    "rare_scripts": "Ελληνικά Русский עברית العربية 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \ue000 \U0001f9ff\U000e0001",
    "specials": "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>hm</think>ok[EOS]",
    "specials_glued": "x<|im_end|>y [BOS] [PAD] [UNK]<think>\n<|tool_call_begin|>functions.f:0<|tool_call_end|>",
    "special_lookalikes": "<|im_end| <|im_end <think </think [EOS [BOS]] <<|im_end|>>",
    "filler_names": f"{FILLER} and [PAD{N_RANKS + 200}] and [PAD300] [PAD]",
}


def _metadata(**overrides: Any) -> dict[str, Any]:
    return {**METADATA, **overrides}


def _write_vocab_gguf(path: Path, metadata: dict[str, Any]) -> Path:
    # With vocab_only llama.cpp stops reading hyperparameters after general.name (llama-model.cpp
    # load_hparams), so the architecture and the tokenizer keys are all such a file needs.
    writer = GGUFWriter(path, "deepseek2")
    writer.add_string("general.name", "Kimi-K2 demo vocab")
    add_tokenizer_to(writer, metadata)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_vocab_gguf(tmp_path_factory.mktemp("vocab") / "kimi-demo-vocab.gguf", METADATA)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(METADATA)


@pytest.fixture(scope="session")
def llama_ids(vocab_file: Path) -> dict[bool, dict[str, list[int]]]:
    """parse_special -> text name -> llama.cpp's ids."""
    return {special: dict(zip(TEXTS, llama_oracle.tokenize(vocab_file, list(TEXTS.values()), special)))
            for special in (True, False)}


@needs_llama_cpp
@pytest.mark.parametrize("parse_special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_llama_cpp(tokenizer, llama_ids, name, parse_special):
    assert tokenizer.encode(TEXTS[name], parse_special=parse_special) == llama_ids[parse_special][name]


def test_specials_are_single_tokens_only_when_parsed(tokenizer):
    text = "a<|im_end|>b"
    assert tokenizer.encode(text).count(tokenizer.eos_id) == 1
    assert tokenizer.eos_id not in tokenizer.encode(text, parse_special=False)
    assert N_RANKS + 5 not in tokenizer.encode(FILLER)  # UNUSED fillers are plain text


@needs_llama_cpp
@pytest.mark.parametrize("add_bos_token", [False, True])
def test_add_bos_follows_the_file(tmp_path, add_bos_token):
    metadata = _metadata(**{"tokenizer.ggml.add_bos_token": add_bos_token})
    path = _write_vocab_gguf(tmp_path / "vocab.gguf", metadata)
    texts = ["Hello", "<|im_user|>user<|im_middle|>Hi"]
    tok = Tokenizer.from_metadata(metadata)
    assert [tok.encode(t) for t in texts] == llama_oracle.tokenize(path, texts, add_bos=True)
    assert tok.encode("Hello", add_bos=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("Hello", add_bos=False)


@needs_llama_cpp
def test_pieces_match_llama_cpp(tokenizer, vocab_file):
    ids = list(range(tokenizer.vocab_size))
    assert [tokenizer.token_bytes(i) for i in ids] == llama_oracle.pieces(vocab_file, ids)


@needs_llama_cpp
def test_special_ids_match_llama_cpp(tokenizer, vocab_file):
    info = llama_oracle.vocab_info(vocab_file)
    assert info["n_vocab"] == tokenizer.vocab_size
    assert (info["bos"], info["eos"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert set(info["eog"]) == tokenizer.eog_ids
    assert info["add_bos"] is False
    names = {METADATA["tokenizer.ggml.tokens"][i] for i in tokenizer.eog_ids}
    assert names == {"<|im_end|>", "[EOS]", "[EOT]", "[PAD]"}


@pytest.mark.parametrize("name", TEXTS)
def test_decode_round_trips(tokenizer, name):
    assert tokenizer.decode(tokenizer.encode(TEXTS[name])) == TEXTS[name]
    assert tokenizer.decode(tokenizer.encode(TEXTS[name], parse_special=False)) == TEXTS[name]


@pytest.mark.parametrize("name", ["emoji", "emoji_zwj", "cjk_latin", "combining_marks"])
def test_stream_decoder_holds_back_partial_characters(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert any(not _is_utf8(tokenizer.token_bytes(i)) for i in ids), "no token splits a character here"
    stream = tokenizer.stream_decoder()
    chunks = [stream.add(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text


def test_stream_decoder_flush_marks_a_cut_off_character(tokenizer):
    emoji_ids = tokenizer.encode("🦜")  # not in the training corpus: one token per byte
    stream = tokenizer.stream_decoder()
    assert stream.add(emoji_ids[0]) == ""
    assert stream.flush() == "\ufffd"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
    {"role": "user", "content": "And 3+3? 谢谢 😀"},
]


def _direct_render(template: str, messages, add_generation_prompt=True) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="[BOS]", eos_token="<|im_end|>")


@needs_llama_cpp
def test_chat_template_matches_llama_cpp_builtin_kimi_format(tokenizer, vocab_file):
    messages = [{"role": m["role"], "content": m["content"]} for m in CONVERSATION]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == llama_oracle.chat(vocab_file, messages)
    assert prompt.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert tokenizer.encode(prompt) == llama_oracle.tokenize(vocab_file, [prompt])[0]


TOOL_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
    {"role": "tool", "content": "4"},
]


def test_default_system_prompt_and_thinking_template():
    instruct = Tokenizer.from_metadata(METADATA).apply_chat_template(CONVERSATION[1:])
    assert instruct.startswith("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by "
                               "Moonshot AI.<|im_end|>")
    thinking = Tokenizer.from_metadata(demo_tokenizer_metadata("thinking"))
    assert thinking.chat_template == KIMI_K2_THINKING_TEMPLATE != KIMI_K2_INSTRUCT_TEMPLATE
    # Finished assistant turns lose their reasoning; the current tool-calling turn keeps it.
    history = thinking.apply_chat_template(CONVERSATION)
    assert "<|im_assistant|>assistant<|im_middle|><think></think>4<|im_end|>" in history
    agentic = thinking.apply_chat_template(TOOL_TURN)
    assert ("<|im_assistant|>assistant<|im_middle|><think>Use the tool.</think><|tool_calls_section_begin|>"
            "<|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{\"a\": 2, \"b\": 2}<|tool_call_end|>"
            "<|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>## Return of functions.add:0\n4"
            "<|im_end|><|im_assistant|>assistant<|im_middle|>") in agentic


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], TOOL_TURN],
                         ids=["with_system", "default_system", "tool_call"])
def test_chat_template_equals_direct_jinja_render(tokenizer, messages, add_generation_prompt):
    assert tokenizer.apply_chat_template(messages, add_generation_prompt) == \
        _direct_render(METADATA["tokenizer.chat_template"], messages, add_generation_prompt)


def test_missing_chat_template_is_a_clear_error():
    tok = Tokenizer.from_metadata({k: v for k, v in METADATA.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no tokenizer.chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.model", "llama", "only implements byte-level BPE"),
    ("tokenizer.ggml.model", None, "only implements byte-level BPE"),
    ("tokenizer.ggml.pre", "qwen2", "supported pre-tokenizers are kimi-k2"),
    ("tokenizer.ggml.tokens", [], "no tokenizer.ggml.tokens"),
    ("tokenizer.ggml.token_type", [1, 1], "inconsistent"),
    ("tokenizer.ggml.eos_token_id", 10**6, "not an id in the"),
])
def test_unsupported_metadata_is_rejected(key, value, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_metadata(_metadata(**{key: value}))


def test_missing_merges_are_rebuilt_from_ranks(tokenizer):
    without = Tokenizer.from_metadata({k: v for k, v in METADATA.items() if k != "tokenizer.ggml.merges"})
    assert [without.encode(t) for t in TEXTS.values()] == [tokenizer.encode(t) for t in TEXTS.values()]
    with pytest.raises(ValueError, match="no tokenizer.ggml.merges"):
        Tokenizer.from_metadata({k: v for k, v in _metadata(**{"tokenizer.ggml.pre": "deepseek-v3"}).items()
                                 if k != "tokenizer.ggml.merges"})


# Characters for random text: every class the splitters distinguish. Letters new in Unicode 16 are left
# out: Oniguruma knows them, llama.cpp's tables (Unicode 15) do not, and such text is split differently.
RANDOM_POOL = (list("abcXYZ sStTmMdDlLrReEvV'’0123456789.,!?;:-_()[]{}<>/\\\"#@")
               + list(" \t\n\r\u00a0\u3000\u2028\u0085\u200b\u200d\ufe0f")
               + list("中文字汉々〇⺀㐀𠀀𪜀豈ひらカタ한국") + list("\u0301\u0308\u0915\u094d\u0924\u0e20\u0e32")
               + list("😀👍🏽👨👩❤🇯🇵🔥١٢½①Ⅻ５\ue000\U000e0001ſǄǅʰª"))


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["kimi-k2", "deepseek-v3"])
def test_word_boundaries_match_llama_cpp(tmp_path, pre):
    # A vocab trained without any word split has merges across every boundary, so any difference between
    # our split and llama.cpp's shows up as different ids (the demo vocab can hide some).
    rng = random.Random(0)
    random_texts = ["".join(rng.choices(RANDOM_POOL, k=rng.randint(1, 40))) for _ in range(300)]
    specials = re.compile("|".join(map(re.escape, SPECIAL_OFFSETS)))
    texts = [specials.sub(" ", t) for t in TEXTS.values()] + random_texts
    ranks, merges = train_bpe(texts, split_pattern=None, max_ranks=20000)
    metadata = {**kimi_tokenizer_metadata(ranks, merges), "tokenizer.ggml.pre": pre}
    tok = Tokenizer.from_metadata(metadata)
    expected = llama_oracle.tokenize(_write_vocab_gguf(tmp_path / "probe.gguf", metadata), texts)
    assert [t for t, ids in zip(texts, expected) if tok.encode(t) != ids] == []


def test_demo_vocab_layout():
    tokens, types = METADATA["tokenizer.ggml.tokens"], METADATA["tokenizer.ggml.token_type"]
    assert 2000 <= N_RANKS <= 4000 and len(tokens) == N_RANKS + 256
    assert all(t == 1 for t in types[:N_RANKS])
    for text, offset in SPECIAL_OFFSETS.items():
        assert (tokens[N_RANKS + offset], types[N_RANKS + offset]) == (text, 3)
    fillers = [i for i in range(N_RANKS, len(tokens)) if types[i] == 5]
    assert len(fillers) == 256 - len(SPECIAL_OFFSETS)
    assert all(tokens[i] == f"[PAD{i}]" for i in fillers)
    assert METADATA["tokenizer.ggml.eos_token_id"] == N_RANKS + 2
    assert METADATA["tokenizer.ggml.padding_token_id"] == N_RANKS + 255
