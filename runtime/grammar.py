"""Constrained decoding: a grammar (Lark, with JSON schemas inside) turned into the set of tokens a sequence
may sample next, by llguidance.

A GrammarTokenizer gives llguidance the vocabulary once (a few hundred ms at 163,840 tokens); `compile` checks
a grammar and refuses it with the library's reason; each sequence gets its own GrammarMatcher, which masks its
logits row before sampling and is told each token sampled. The mask is computed while the model runs the step
(llguidance releases the GIL), so constrained sequences cost the others little.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import llguidance
import llguidance.numpy
import numpy as np

from .tokenizer import Tokenizer

SPECIAL = b"\xff"  # how llguidance tells a special token (a marker written <|name|> in Lark) from text bytes


class GrammarError(ValueError):
    """The grammar library refused a grammar; the message is its reason."""


class _Vocabulary:
    """Our tokenizer in the shape llguidance's TokenizerWrapper reads: bytes per id, specials marked."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        specials = tokenizer.special_ids
        self.tokens = [SPECIAL + tokenizer.token_bytes(i) if i in specials else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(specials)

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), parse_special=False, add_bos=False)


class GrammarTokenizer:
    """The vocabulary as llguidance needs it, built once per model; any end-of-generation token ends a
    grammar's text once the grammar is complete."""

    def __init__(self, tokenizer: Tokenizer):
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
        self.lltokenizer = llguidance.LLTokenizer(wrapper, eos_token=sorted(tokenizer.eog_ids))
        self.mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def compile(self, lark: str, prefix: Sequence[int] = ()) -> Grammar:
        """A Lark grammar checked by llguidance; `prefix`: tokens already written (in the prompt) that the
        grammar reads first. Raises GrammarError with the library's reason."""
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise GrammarError(error)
        return Grammar(self, grammar, tuple(prefix))

    @staticmethod
    def check_json_schema(schema: dict) -> None:
        """Raises GrammarError if llguidance cannot constrain output to this JSON schema."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise GrammarError(error)


@dataclass(frozen=True)
class Grammar:
    """A checked grammar; each sequence that uses it gets a matcher of its own."""
    tokenizer: GrammarTokenizer
    compiled: str
    prefix: tuple[int, ...]

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """Where one sequence stands in its grammar. Per step: `start_mask()` before the model runs, `apply(row)`
    on the sequence's logits after it, `accept(token)` once a token is sampled."""

    def __init__(self, grammar: Grammar):
        self._tokenizer = grammar.tokenizer
        self._matcher = llguidance.LLMatcher(grammar.tokenizer.lltokenizer, grammar.compiled, log_level=0)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, grammar.tokenizer.lltokenizer.vocab_size)
        self._pending: Future | None = None
        if grammar.prefix and not self._matcher.consume_tokens(list(grammar.prefix)):
            raise GrammarError(f"the reply's forced start does not fit its grammar: {self._matcher.get_error()}")

    def start_mask(self) -> None:
        """Compute the next mask in the background (the model's step runs meanwhile)."""
        if self._pending is None:
            self._pending = self._tokenizer.mask_thread.submit(
                llguidance.numpy.fill_next_token_bitmask, self._matcher, self._bitmask, 0)

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place ([V] row)."""
        self.start_mask()
        self._pending.result()
        self._pending = None
        if self._matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {self._matcher.get_error()}")
        allowed = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[:logits.shape[-1]]
        logits[allowed == 0] = -np.inf

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, from the first, the grammar allows in turn from here (the matcher stays)."""
        return self._matcher.validate_tokens(tokens)

    def accept(self, token: int) -> None:
        if self._matcher.is_stopped() and not self._matcher.is_error():
            return  # complete, its end token taken: more end tokens (generation past them) change nothing
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {self._matcher.get_error()}")
