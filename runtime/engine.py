"""Generation with continuous batching.

Requests join and leave the running batch between steps. Each step is ONE model.forward over every
running sequence: one token for each sequence that is decoding, plus a chunk of the prompts still being
prefilled (at most `max_step_tokens` rows in all, so a long prompt never stalls the others). With a
RemoteExperts backend that is one request per worker per layer for the whole batch.

Rows of different sequences never mix: with the head's weights read in place (plain ggml kernels; routed
experts may be repacked, as they run row by row) a sequence gets exactly the tokens it would get alone.
(ggml's repacked matmuls treat rows in groups of four, so with a repacked head a row's rounding depends
on its neighbours, as in llama.cpp.)

A sequence may be constrained (banned tokens, a grammar for structured output): its logits row is masked
before sampling, with the grammar's mask computed while the model runs the step; logprobs stay the model's.

A decoding sequence may also feed tokens drafted from its context (speculative.py) in the same step: their
rows' logits say what the model would have written after each, and the sequence samples row by row, as it
would have one step at a time, while its samples agree with the draft. The first disagreement is its last
token of the step; the cache rows of the rejected drafts are given back (the cache's length), and are written
over next. Every token is sampled from the model's own distribution for its position, with the sequence's
own generator, so the output is what decoding without drafts gives: bit for bit with the head's weights read in
place (a drafted row attends and is routed alone, ggml_forward.py), within a repacked head's rounding otherwise.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .grammar import Grammar
from .kv_cache import KVCache, Segment
from .model import KimiModel
from .prompt_cache import PromptCache
from .sampling import Sampler, SamplingParams, largest, sample_rows
from .speculative import Drafter, DraftStore


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop_tokens: frozenset[int] = frozenset()
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's log-probability and the n best
    banned_tokens: frozenset[int] = frozenset()  # never sampled (e.g. a tool-call section when tools are off)
    grammar: Grammar | None = None  # what the reply must follow (constrained decoding), if anything


@dataclass(frozen=True)
class TokenOutput:
    token: int
    finish_reason: str | None  # "stop" (a stop token), "length" (max_tokens), None while running
    logprob: float | None = None  # log-probability under the model (before sampling settings)
    top_logprobs: tuple[tuple[int, float], ...] = ()


class ContextLengthExceeded(ValueError):
    """A request that does not fit in the context; `field` is what to change: "prompt" or "max_tokens"."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class EngineFull(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


class EngineStopped(RuntimeError):
    """The engine was stopped (the server shuts down) before this sequence ended."""


class SequenceFailed(RuntimeError):
    """The forward pass failed (e.g. a worker died) while this sequence was running; `cause` says why."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


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


# on_output receives each TokenOutput, or a SequenceFailed once if the sequence cannot go on.
OutputCallback = Callable[[TokenOutput | SequenceFailed], None]


class SequenceState:
    """A request inside the engine: its KV cache (allocated when it starts running), sampler and progress."""

    def __init__(self, request: Request, on_output: OutputCallback):
        self.request, self.on_output = request, on_output
        self.sampler = Sampler(request.params)
        self.matcher = request.grammar.matcher() if request.grammar is not None else None
        self.history = list(request.prompt)
        self.cache: KVCache | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.reused = 0  # of them, those taken from an earlier sequence's cache (prompt reuse)
        self.generated = 0
        self.cancelled = False
        self.last_logits: np.ndarray | None = None  # logits the first token was sampled from
        self.drafter: Drafter | None = None  # from its first decoding step, when the engine drafts
        self.draft: list[int] = []  # the tokens it drafted for the step that runs

    @property
    def drafted(self) -> int:
        return self.drafter.drafted if self.drafter is not None else 0

    @property
    def accepted(self) -> int:
        """Drafted tokens that were right (each one a token this sequence got without a step of its own)."""
        return self.drafter.accepted if self.drafter is not None else 0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt)

    def next_rows(self, budget: int) -> list[int]:
        """The tokens this sequence feeds into the next step: a prompt chunk, or its last sampled token."""
        if self.prefilling:
            return list(self.request.prompt[self.prefilled: self.prefilled + budget])
        return [self.history[-1], *self.draft]


class Engine:
    """Runs many sequences on one model. Use `generate` for one sequence in the caller's thread, or
    `start()` a background loop and `submit` requests from any thread."""

    def __init__(self, model: KimiModel, context_size: int = 4096, max_sequences: int = 16,
                 max_step_tokens: int = 512, max_waiting: int = 256, prompt_cache: PromptCache | None = None,
                 max_draft: int = 0):
        """max_draft: the most tokens a sequence may draft per step (speculative.parse_speculate); 0: none."""
        if context_size > model.config.context_length:
            raise ValueError(f"context size {context_size} exceeds the model's {model.config.context_length}")
        if max_sequences < 1 or max_step_tokens <= max_sequences:
            raise ValueError("need max_sequences >= 1 and max_step_tokens > max_sequences "
                             f"(got {max_sequences} and {max_step_tokens})")
        self.model, self.context_size = model, context_size
        self.max_sequences, self.max_step_tokens, self.max_waiting = max_sequences, max_step_tokens, max_waiting
        self.prompt_cache = prompt_cache  # where ended sequences' KV is kept for reuse, if anywhere
        self.max_draft = max_draft
        self.draft_store = DraftStore() if max_draft else None  # recent replies, drafted from by every sequence
        self.drafted_tokens = self.accepted_tokens = 0  # totals over every sequence
        self.waiting: list[SequenceState] = []
        self.running: list[SequenceState] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_step: Callable[[int, float], None] | None = None  # (rows, seconds) after every step

    # ---- requests ----

    def check(self, request: Request) -> None:
        """Raise ValueError with a message for the user if the request can never run."""
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if len(request.prompt) >= self.context_size:
            raise ContextLengthExceeded(f"the prompt is {len(request.prompt)} tokens long but the context holds "
                                        f"{self.context_size}; shorten the prompt", "prompt")
        if len(request.prompt) + request.max_tokens > self.context_size:
            raise ContextLengthExceeded(f"the prompt ({len(request.prompt)} tokens) plus max_tokens "
                                        f"({request.max_tokens}) exceeds the context size {self.context_size}; "
                                        "lower max_tokens", "max_tokens")
        if (bad := [t for t in request.prompt if not 0 <= t < self.model.config.vocab_size]):
            raise ValueError(f"prompt token ids must lie in [0, {self.model.config.vocab_size}), got {bad[:5]}")

    def submit(self, request: Request, on_output: OutputCallback) -> SequenceState:
        self.check(request)
        sequence = SequenceState(request, on_output)
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests are already waiting; retry later")
            self.waiting.append(sequence)
            self._lock.notify()
        return sequence

    def cancel(self, sequence: SequenceState) -> None:
        """Stop a sequence; its KV cache is freed before the next step."""
        with self._lock:
            sequence.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        """Sequences in the batch, not counting cancelled ones that the next step drops."""
        return sum(not s.cancelled for s in self.running)

    @property
    def num_waiting(self) -> int:
        return sum(not s.cancelled for s in self.waiting)

    # ---- stepping ----

    def step(self) -> int:
        """Run one forward pass over the running batch; returns the rows computed (0 when idle)."""
        with self._lock:
            self.waiting = [s for s in self.waiting if not s.cancelled]
            cancelled = [s for s in self.running if s.cancelled]
            self.running = [s for s in self.running if not s.cancelled]
            for sequence in cancelled:
                self._keep(sequence)
            while self.waiting and len(self.running) < self.max_sequences:
                sequence = self.waiting.pop(0)
                self._start(sequence)
                self.running.append(sequence)
                if self.prompt_cache is not None:
                    self.prompt_cache.make_room(self._running_rows())
            batch = self._plan_batch()
        if not batch:
            return 0
        started = time.perf_counter()
        tokens = np.concatenate([np.asarray(rows, np.int32) for _, rows in batch])
        segments, start = [], 0
        for sequence, rows in batch:
            segments.append(Segment(sequence.cache, start, len(rows), logits=1 + len(sequence.draft)))
            start += len(rows)
        for sequence, _ in batch:
            if sequence.matcher is not None:
                sequence.matcher.start_mask()  # computed while the model runs
        try:
            logits = self.model.forward(tokens, segments)
        except Exception as e:  # the model or a worker failed: every sequence in this step ends with the reason
            self._fail([s for s, _ in batch], e)
            return len(tokens)
        sampling, first = [], 0  # (sequence, its logits rows) of the sequences that get tokens this step
        for segment, (sequence, rows) in zip(segments, batch):
            block, first = logits[first: first + segment.logits], first + segment.logits
            if sequence.prefilling:
                sequence.prefilled += len(rows)
                if sequence.prefilling:
                    continue
                sequence.last_logits = block[0].copy()  # a constrained row is masked in place
            sampling.append((sequence, block))
        self._sample(sampling)
        if self.on_step is not None:
            self.on_step(len(tokens), time.perf_counter() - started)
        return len(tokens)

    def _sample(self, sampling: list[tuple[SequenceState, np.ndarray]]) -> None:
        """Each sequence's tokens from its logits rows: row i after its first i drafted tokens. Rows are taken in
        rounds, every sequence's row i together; a sequence goes on to its next row while its sample equals its
        draft."""
        position = 0
        while sampling:
            rows, unmasked, ready = [], [], []
            for sequence, block in sampling:
                row = block[position]
                unmasked.append(row)
                if sequence.request.banned_tokens or sequence.matcher is not None:
                    unmasked[-1] = row.copy()
                    try:
                        self._constrain(sequence, row)
                    except Exception as e:
                        self._fail([sequence], e)
                        unmasked.pop()
                        continue
                rows.append(row)
                ready.append((sequence, block))
            sequences = [sequence for sequence, _ in ready]
            sampled = sample_rows([s.sampler for s in sequences], rows, [s.history for s in sequences])
            going_on = []
            for (sequence, block), row, token in zip(ready, unmasked, sampled):
                try:
                    if isinstance(token, ValueError):  # e.g. NaN logits: this sequence ends, the others go on
                        raise token
                    finished = self._emit(sequence, row, token)
                except Exception as e:
                    self._fail([sequence], e)
                    continue
                agrees = position < len(sequence.draft) and token == sequence.draft[position]
                if agrees and not finished:
                    going_on.append((sequence, block))
                elif sequence.draft:
                    self._verified(sequence, accepted=position + agrees)
            sampling, position = going_on, position + 1

    def _verified(self, sequence: SequenceState, accepted: int) -> None:
        sequence.drafter.verified(len(sequence.draft), accepted)
        self.drafted_tokens += len(sequence.draft)
        self.accepted_tokens += accepted
        sequence.draft = []

    @staticmethod
    def _constrain(sequence: SequenceState, logits: np.ndarray) -> None:
        """Rule out the tokens this sequence may not sample next (its logits row, in place)."""
        if sequence.request.banned_tokens:
            logits[list(sequence.request.banned_tokens)] = -np.inf
        if sequence.matcher is not None:
            sequence.matcher.apply(logits)

    def _start(self, sequence: SequenceState) -> None:
        """Give a sequence its cache, its prompt's beginning already there if an earlier sequence computed it.
        A cache spans the whole context (memory comes as rows are written), so that the conversation's next
        turn, which sends more, can take it over whole."""
        if self.prompt_cache is None:
            sequence.cache = self.model.new_cache(self.context_size)
            return
        running = [(s.history, s.cache) for s in self.running if s.cache is not None]
        sequence.cache, sequence.reused = self.prompt_cache.start(sequence.request.prompt, self.context_size,
                                                                  self.model.new_cache, running)
        sequence.prefilled = sequence.reused

    def _keep(self, sequence: SequenceState) -> None:
        """A sequence has ended (and left self.running): its cache goes to the prompt cache (when there is one)
        or away."""
        if self.prompt_cache is not None and sequence.cache is not None:
            self.prompt_cache.make_room(self._running_rows())  # it no longer runs
            self.prompt_cache.keep(sequence.history, sequence.cache)
        if self.draft_store is not None and sequence.generated:
            self.draft_store.add(sequence.history[len(sequence.request.prompt):])
        sequence.cache = None

    def _running_rows(self) -> int:
        """Rows the running sequences' caches may fill (what the prompt cache leaves them, when it shares)."""
        return sum(s.cache.capacity for s in self.running if s.cache is not None)

    def _plan_batch(self) -> list[tuple[SequenceState, list[int]]]:
        """Decoding sequences first (one row each, and their drafts within half of what the budget leaves), then
        prompt chunks in arrival order within the budget (and within what a long context's attention may take
        in one step)."""
        decoding = [s for s in self.running if not s.prefilling]
        budget = self.max_step_tokens - len(decoding)
        drafts = budget // 2
        for sequence in decoding:
            sequence.draft = self._draft(sequence, drafts)
            drafts -= len(sequence.draft)
            budget -= len(sequence.draft)
        prefills = []
        for sequence in self.running:
            if sequence.prefilling and budget > 0:
                left = len(sequence.request.prompt) - sequence.prefilled
                rows = sequence.next_rows(self.model.prefill_rows(sequence.cache, min(budget, left)))
                prefills.append((sequence, rows))
                budget -= len(rows)
        return [(s, s.next_rows(1)) for s in decoding] + prefills

    def _draft(self, sequence: SequenceState, budget: int) -> list[int]:
        """The tokens a decoding sequence drafts for this step: none past its max_tokens, none the step's
        attention memory could not take, and only tokens its constraints allow."""
        if not self.max_draft:
            return []
        if sequence.drafter is None:
            sequence.drafter = Drafter(sequence.history, self.draft_store, self.max_draft)
        room = min(budget, sequence.request.max_tokens - sequence.generated - 1, sequence.drafter.limit)
        if room > 0:
            room = self.model.prefill_rows(sequence.cache, 1 + room) - 1
        draft = sequence.drafter.propose(sequence.history, room)
        banned = sequence.request.banned_tokens
        if banned and (cut := [i for i, token in enumerate(draft) if token in banned]):
            draft = draft[:cut[0]]
        if sequence.matcher is not None and draft:
            draft = draft[:sequence.matcher.valid_prefix(draft)]
        return draft

    def _emit(self, sequence: SequenceState, logits: np.ndarray, token: int) -> bool:
        """Hand a sampled token to its sequence; returns whether the sequence has ended."""
        request = sequence.request
        if sequence.matcher is not None:
            sequence.matcher.accept(token)
        sequence.history.append(token)
        sequence.generated += 1
        sequence.cache.length = len(sequence.history) - 1  # rows past it held drafts that were not taken
        finish = "stop" if token in request.stop_tokens else \
            "length" if sequence.generated >= request.max_tokens else None
        logprob, top = None, ()
        if request.top_logprobs is not None:
            logprob, top = token_logprobs(logits, token, request.top_logprobs)
        if finish is not None:
            with self._lock:
                self.running.remove(sequence)
                self._keep(sequence)
        sequence.on_output(TokenOutput(token, finish, logprob, top))
        return finish is not None

    def _fail(self, sequences: list[SequenceState], error: Exception) -> None:
        with self._lock:
            self.running = [s for s in self.running if s not in sequences]
        for sequence in sequences:
            sequence.cache = None
            try:
                sequence.on_output(SequenceFailed(error))
            except Exception:  # noqa: BLE001 - a consumer that cannot take the news must not stop the engine
                pass

    # ---- background loop ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background loop; requests still waiting or running end as failed, so that their streams
        end (a server shutting down) rather than wait for tokens that will not come."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            left, self.waiting = [s for s in self.waiting + self.running if not s.cancelled], []
        self._fail(left, EngineStopped("the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.busy:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a fault outside the model (a bug) must not leave requests waiting forever
                self._fail(list(self.running), e)

    # ---- one sequence, in the caller's thread ----

    def generate(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: frozenset[int] = frozenset(), stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield up to max_tokens sampled tokens; stops early after a stop token (which is yielded).
        Not for use while the background loop runs."""
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt)
        outputs: list[TokenOutput | SequenceFailed] = []
        sequence = self.submit(Request(tuple(prompt), max_tokens, params, stop_tokens), outputs.append)
        started = time.perf_counter()
        try:
            while True:
                self.step()
                for output in outputs:
                    if isinstance(output, SequenceFailed):
                        raise output.cause
                    if stats.generated_tokens == 0:
                        stats.prompt_seconds = time.perf_counter() - started
                        stats.prompt_logits = sequence.last_logits
                        started = time.perf_counter()
                    else:
                        stats.decode_seconds = time.perf_counter() - started
                    stats.generated_tokens += 1
                    stats.finish_reason = output.finish_reason or ""
                    yield output.token
                    if output.finish_reason:
                        return
                outputs.clear()
        finally:
            self.cancel(sequence)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log softmax of the raw logits: the chosen token's value and the `top` best (id, value), best first."""
    top_logit = float(logits.max())
    # float32 exponentials (a tenth of the float64 cost), summed in float64
    log_z = top_logit + float(np.log(np.exp(logits - top_logit, dtype=np.float32).sum(dtype=np.float64)))
    best = largest(logits, top) if top else []  # a partition, not a sort of the whole vocabulary
    return float(logits[token]) - log_z, tuple((int(i), float(logits[i]) - log_z) for i in best)
