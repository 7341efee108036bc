"""Generated tokens -> text deltas for a client: stop strings, held-back partial text, reasoning split.

A stop string may arrive split across tokens, so any tail of the text that could still become one is
held back until the next token decides; the stop string itself is never returned. Tokens between
<think> and </think> (Kimi's reasoning) go to `reasoning` instead of `content`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class TextDelta:
    content: str = ""
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning)


def reasoning_markers(tokenizer: Tokenizer, chat_template: str | None) -> tuple[int, int] | None:
    """The ids of <think> and </think> when the chat template emits reasoning that way, else None."""
    if not chat_template or THINK_OPEN not in chat_template:
        return None
    ids = tokenizer.encode(THINK_OPEN, parse_special=True), tokenizer.encode(THINK_CLOSE, parse_special=True)
    if any(len(i) != 1 for i in ids):
        return None
    return ids[0][0], ids[1][0]


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), hidden_tokens: frozenset[int] = frozenset(),
                 reasoning: tuple[int, int] | None = None, in_reasoning: bool = False):
        """hidden_tokens: ids that produce no text (end-of-generation tokens). reasoning: (<think>, </think>)
        ids to split on; in_reasoning: the prompt already opened <think>."""
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
        self._hidden = hidden_tokens
        self._reasoning = reasoning
        self._in_reasoning = in_reasoning and reasoning is not None
        self._pending = ""  # decoded text not yet returned
        self.stopped = False  # a stop string was found; nothing more will be returned

    def add(self, token: int) -> TextDelta:
        if self.stopped or token in self._hidden:
            return TextDelta()
        if self._reasoning is not None and token in self._reasoning:
            delta = self._release(everything=True)
            self._in_reasoning = token == self._reasoning[0]
            return delta
        self._pending += self._decoder.add(token)
        return self._release(everything=False)

    def finish(self) -> TextDelta:
        """Everything still held back (the generation is over)."""
        if self.stopped:
            return TextDelta()
        self._pending += self._decoder.flush()
        return self._release(everything=True)

    def _release(self, everything: bool) -> TextDelta:
        text, self._pending = self._pending, ""
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if found:
            text, self.stopped = text[:min(found)], True
        elif not everything:
            held = self._stop_prefix_length(text)
            text, self._pending = text[:len(text) - held], text[len(text) - held:]
        return TextDelta(reasoning=text) if self._in_reasoning else TextDelta(content=text)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of text that is the start of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
