"""Tokenizer: text <-> token ids exactly as llama.cpp does it for a Kimi K2.x GGUF (byte-level BPE).

llama_tokenize runs three stages, and so does `Tokenizer.encode`:
  1. special tokens: the text is cut at every CONTROL / USER_DEFINED / UNKNOWN token text, longest
     token first (llama-vocab.cpp tokenizer_st_partition); UNUSED fillers are never matched;
  2. pre-tokenizer: each remaining piece is split into words by the regexes of `tokenizer.ggml.pre`;
  3. byte-level BPE on each word with the file's merges, lowest merge rank first, leftmost on ties.
Stages 2 and 3 run in the `tokenizers` library (Oniguruma regexes, Rust BPE); stage 1 is done here
because llama.cpp's longest-first partition and its parse_special switch have no `tokenizers` equivalent.
"""
from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from gguf import TokenType
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from .chat_template import render_chat_template

# llama.cpp's unicode_cpt_is_han (unicode.cpp): fixed CJK ideograph blocks, narrower than the Unicode
# Han script (no 々, 〇, radicals, Extension G+).
_HAN = r"\x{3400}-\x{4DBF}\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2EBEF}\x{2F800}-\x{2FA1F}"
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# Kimi's tokenization_kimi.py pattern splits words at case changes and counts marks (\p{M}) as letters:
#   [\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|...)?
#   |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|...)?
#   |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
# llama.cpp does not run that regex: unicode_regex_split_custom_kimi_k2 is hand-written and takes any run
# of non-Han letters as one word ("CamelCase", "iPhone" stay whole), does not count marks as letters
# (they split words, as punctuation), uses its own Han ranges and an ASCII-only contraction test.
# llama.cpp is the reference, so this is its behaviour written as a regex.
KIMI_K2_PATTERN = "|".join((
    rf"[{_HAN}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+{_CONTRACTION}?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))

# Regex lists llama.cpp applies one after the other (llama-vocab.cpp, llm_tokenizer_bpe) for the
# pre-tokenizers a deepseek2 GGUF can name. Not "deepseek-llm" (DeepSeek V2): llama.cpp runs its regexes
# through std::regex, which treats U+3000 / U+2028 differently from Oniguruma, so ids would differ.
PRE_TOKENIZER_PATTERNS: dict[str, tuple[str, ...]] = {
    "kimi-k2": (KIMI_K2_PATTERN,),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!" + '"' + r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

# Token texts llama.cpp puts in special_eog_ids (llama-vocab.cpp), including the FIM pad/repo/sep
# tokens it also stops on; Kimi's are [EOT], [EOS], <|im_end|> and [PAD].
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
))
# llama.cpp's defaults for a "gpt2" vocab whose file names no bos/eos (llama-vocab.cpp load).
DEFAULT_BOS_ID = DEFAULT_EOS_ID = 11
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE token texts are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_text_to_bytes(text: str) -> bytes:
    decode = unicode_to_byte()
    try:
        return bytes(decode[c] for c in text)
    except KeyError as e:
        raise ValueError(f"token {text!r} is typed NORMAL but is not byte-level text (character {e.args[0]!r} "
                         "is outside GPT-2's byte alphabet); the file's token list is corrupt") from None


def merges_from_ranks(ranked_tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """The merges a tiktoken rank table implies, in rank order (llama.cpp's converter, QwenModel.bpe).

    Each multi-byte token is split back into the two parts that BPE restricted to lower ranks ends with.
    """
    ranks = {token: rank for rank, token in enumerate(ranked_tokens)}
    merges = []
    for rank, token in enumerate(ranked_tokens):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ValueError(f"token rank {rank} ({token!r}) cannot be built from two lower-ranked tokens; "
                             "the vocabulary is not a BPE rank table, so it needs tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """llama.cpp-compatible tokenizer of one GGUF; build it with `Tokenizer.from_metadata`."""

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[tuple[str, str]],
                 pre: str, bos_id: int, eos_id: int, add_bos: bool, chat_template: str | None):
        self._texts = list(tokens)
        self._types = [int(t) for t in token_types]  # gguf.TokenType values; 0 (undefined) is allowed
        self.pre = pre
        for name, token_id in (("bos", bos_id), ("eos", eos_id)):
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < len(self._texts):
                raise ValueError(f"tokenizer.ggml.{name}_token_id is {token_id!r}, not an id in the "
                                 f"{len(self._texts)}-token vocabulary; fix the GGUF's tokenizer metadata")
        self._bos_id, self._eos_id, self.add_bos, self.chat_template = bos_id, eos_id, add_bos, chat_template

        vocab = {text: i for i, text in enumerate(self._texts)}
        if len(vocab) != len(self._texts):  # llama.cpp aborts on such a file (id_to_token/token_to_id assert)
            seen: set[str] = set()
            twice = sorted({t for t in self._texts if t in seen or seen.add(t)})
            raise ValueError(f"tokenizer.ggml.tokens holds {len(self._texts) - len(vocab)} duplicate texts, "
                             f"e.g. {twice[:3]}; every token text must be unique, re-convert the model")
        try:
            bpe = models.BPE(vocab=vocab, merges=list(merges))
        except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
            raise ValueError(f"tokenizer.ggml.merges does not fit tokenizer.ggml.tokens: {e}") from None
        self._bpe = HFTokenizer(bpe)
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_PATTERNS[pre]),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

        # llama.cpp forces control type onto end-of-generation texts, so they are matched in text too.
        is_special = [t in _SPECIAL_TYPES or text in EOG_TEXTS for text, t in zip(self._texts, self._types)]
        by_length = sorted((i for i, s in enumerate(is_special) if s and self._texts[i]),
                           key=lambda i: len(self._texts[i].encode()), reverse=True)
        self._specials_longest_first = by_length
        # USER_DEFINED tokens are matched even when parse_special is off (as in HF tokenizers).
        self._user_defined_longest_first = [i for i in by_length if self._types[i] == TokenType.USER_DEFINED]
        self._piece = [self._piece_bytes(text, t) for text, t in zip(self._texts, self._types)]
        self._eog_ids = frozenset({eos_id} | {i for i, text in enumerate(self._texts) if text in EOG_TEXTS})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """Build from a GGUF's metadata (key -> Python value), e.g. GGUFModelFile.metadata."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; kimi-cluster only implements byte-level BPE "
                             "vocabularies ('gpt2'), which every Kimi K2.x / DeepSeek-V3 GGUF uses")
        pre = metadata.get("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise ValueError(f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers are "
                             f"{', '.join(PRE_TOKENIZER_PATTERNS)}. Re-convert the model with a current "
                             "llama.cpp convert_hf_to_gguf.py, or add its regexes to PRE_TOKENIZER_PATTERNS")
        tokens = _metadata_list(metadata, "tokenizer.ggml.tokens", str)
        if not tokens:
            raise ValueError("the GGUF has no tokenizer.ggml.tokens; it carries no vocabulary")
        token_types = _metadata_list(metadata, "tokenizer.ggml.token_type", int) or [TokenType.NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens; "
                             "the file's tokenizer metadata is inconsistent")
        if "tokenizer.ggml.merges" in metadata:
            merges = [_split_merge(m) for m in _metadata_list(metadata, "tokenizer.ggml.merges", str)]
        elif pre == "kimi-k2":
            # Rebuild the merges from the rank order as llama.cpp's converter (and tiktoken) would. llama.cpp
            # itself loads such a file but merges nothing (every byte its own token); converter-written
            # Kimi files always carry merges, so only hand-made files reach this.
            ranked = [token_text_to_bytes(text) for text, t in zip(tokens, token_types) if t == TokenType.NORMAL]
            to_text = byte_to_unicode()
            merges = [("".join(map(to_text.__getitem__, a)), "".join(map(to_text.__getitem__, b)))
                      for a, b in merges_from_ranks(ranked)]
        else:
            raise ValueError(f"the GGUF has no tokenizer.ggml.merges, which pre-tokenizer {pre!r} needs; "
                             "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"tokenizer.chat_template is a {type(template).__name__}, not text; the file is corrupt")
        return cls(tokens, token_types, merges, pre,
                   bos_id=metadata.get("tokenizer.ggml.bos_token_id", DEFAULT_BOS_ID),
                   eos_id=metadata.get("tokenizer.ggml.eos_token_id", DEFAULT_EOS_ID),
                   add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)), chat_template=template)

    @property
    def vocab_size(self) -> int:
        return len(self._texts)

    @property
    def special_ids(self) -> frozenset[int]:
        """Control and end-of-generation tokens: markers, never pieces of ordinary text."""
        return frozenset(self._specials_longest_first)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation in llama.cpp: eos plus the end-of-turn / FIM-pad tokens found by text."""
        return self._eog_ids

    def encode(self, text: str, parse_special: bool = True, add_bos: bool | None = None) -> list[int]:
        """llama_tokenize(text, add_special=add_bos, parse_special); add_bos None: the file's add_bos_token."""
        ids = [self._bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        fragments = self._split_special(text, parse_special)
        words = [f for f in fragments if isinstance(f, str)]
        encoded = iter(self._bpe.encode_batch(words, add_special_tokens=False))
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(next(encoded).ids)
        return ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Text cut at special-token texts: a list of plain-text pieces and token ids, in order."""
        fragments: list[str | int] = [text] if text else []
        for token_id in self._specials_longest_first if parse_special else self._user_defined_longest_first:
            needle = self._texts[token_id]
            if not any(isinstance(f, str) and needle in f for f in fragments):
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or needle not in fragment:
                    cut.append(fragment)
                    continue
                for n, part in enumerate(fragment.split(needle)):
                    if n:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    @staticmethod
    def _piece_bytes(text: str, token_type: int) -> bytes:
        """llama_token_to_piece(special=true): NORMAL tokens byte-decoded, specials as their text,
        UNUSED fillers as nothing."""
        if token_type in (TokenType.NORMAL, TokenType.BYTE):
            return token_text_to_bytes(text)
        if token_type in _SPECIAL_TYPES:
            return text.encode()
        return b""

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token `token_id` stands for (may be part of a UTF-8 character)."""
        if not 0 <= token_id < len(self._piece):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._piece) - 1})")
        return self._piece[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's entry in the GGUF vocabulary, e.g. "[PAD2640]" for a filler that decodes to nothing."""
        self.token_bytes(token_id)  # validates the id
        return self._texts[token_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text, special tokens included; invalid UTF-8 (a cut-off character) becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render the file's tokenizer.chat_template as transformers would; extra vars (e.g. tools) pass through."""
        if not self.chat_template:
            raise ValueError("this GGUF has no tokenizer.chat_template; format the prompt yourself or re-convert "
                             "the model from a checkpoint whose tokenizer_config.json has a chat_template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self._texts[self._bos_id], eos_token=self._texts[self._eos_id],
                                    **template_vars)


class StreamDecoder:
    """Decodes a token stream piece by piece, holding back bytes of a UTF-8 character not yet complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD if the stream ended inside a character."""
        return self._utf8.decode(b"", final=True)


def _metadata_list(metadata: Mapping[str, Any], key: str, item_type: type) -> list:
    """A list-valued key whose items are all of item_type (absent: an empty list)."""
    values = metadata.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, item_type) for v in values):
        raise ValueError(f"{key} must be a list of {item_type.__name__} values; the file's tokenizer metadata is "
                         "corrupt")
    return values


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp: split at the first space after the first character (byte-level text has no spaces).
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"merge {merge!r} in tokenizer.ggml.merges is not 'left right'")
    return merge[:cut], merge[cut + 1:]
