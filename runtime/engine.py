"""Generation: prefill a prompt in chunks, then decode token by token with a sampler, timing both phases."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .attention import Segment
from .model import KimiModel
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""
    prompt_logits: np.ndarray | None = field(default=None, repr=False)  # [V] at the last prompt position

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (the first token comes from the prefill) per second."""
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    def __init__(self, model: KimiModel, context_size: int = 4096, prefill_chunk: int = 512):
        if context_size > model.config.context_length:
            raise ValueError(f"context size {context_size} exceeds the model's {model.config.context_length}")
        self.model, self.context_size, self.prefill_chunk = model, context_size, prefill_chunk

    def generate(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: frozenset[int] = frozenset(), stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield up to max_tokens sampled tokens; stops early after a stop token (which is yielded)."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) + max_tokens > self.context_size:
            raise ValueError(f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                             f"size {self.context_size}; shorten the prompt or raise --context")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt)
        cache = self.model.new_cache(len(prompt) + max_tokens)
        sampler = Sampler(params)
        history = list(prompt)

        started = time.perf_counter()
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = np.asarray(prompt[start: start + self.prefill_chunk], np.int32)
            logits = self.model.forward(chunk, [Segment(cache, 0, len(chunk))])[0]
        stats.prompt_logits = logits
        stats.prompt_seconds = time.perf_counter() - started

        started = time.perf_counter()
        stats.finish_reason = "length"
        for produced in range(max_tokens):
            token = sampler.sample(logits, history)
            history.append(token)
            stats.generated_tokens = produced + 1
            yield token
            if token in stop_tokens:
                stats.finish_reason = "stop"
                break
            if produced + 1 < max_tokens:
                logits = self.model.forward(np.array([token], np.int32), [Segment(cache, 0, 1)])[0]
                stats.decode_seconds = time.perf_counter() - started
