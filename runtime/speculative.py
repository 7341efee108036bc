"""Speculative drafting without a draft model: the tokens that followed an earlier place in the sequence's own
context (or in recent replies) where its last tokens occurred, guessed to follow again.

Coding agents copy all the time (file contents, tool output, code being edited). A draft costs a few extra
rows in the sequence's next step, which the engine verifies there: at Kimi's size a step is bound by reading
the head's weights and by one round trip per MoE layer to the workers, so rows that are accepted come almost
free, and a step that accepts k drafted tokens yields k + 1.

A place matches when at least MIN_MATCH tokens before it equal the sequence's last ones; of the most recent
such places, the one whose run of equal tokens is the longest wins (SuffixDecoding's longest suffix match,
llama.cpp's n-gram lookup). The draft length adapts per sequence: it doubles while drafts are accepted whole,
shrinks to what was accepted, and a draft rejected outright makes the sequence wait before it drafts again
(twice as long each time in a row), so text that does not repeat costs few rows.
"""
from __future__ import annotations

from typing import Sequence

MIN_MATCH = 2  # tokens that must agree before a place is drafted from
CANDIDATES = 8  # most recent places whose match is measured
LONGEST_MEASURED = 64  # a match is measured this far back at most
STORE_TOKENS = 1 << 16  # tokens of recent replies kept for every sequence to draft from
MAX_WAIT = 32  # steps at most without drafting after rejected drafts
SEPARATOR = -1  # between replies in the store: no match runs across two of them
AUTO_LOCAL = 32  # every expert in this process: a drafted row costs a share of a step's expert work
AUTO_REMOTE = 64  # experts on workers: a step is bound by its round trips, which every row shares


def parse_speculate(text: str, experts_remote: bool) -> int:
    """`--speculate auto|off|N` -> the most tokens a sequence may draft per step (0: none)."""
    if text == "auto":
        return AUTO_REMOTE if experts_remote else AUTO_LOCAL
    if text == "off":
        return 0
    if not text.isdigit():
        raise ValueError(f"--speculate takes auto, off or a number of tokens, not {text!r}")
    return int(text)


class TokenIndex:
    """A token sequence and where each pair of consecutive tokens in it occurs."""

    def __init__(self, tokens: Sequence[int] = ()):
        self.tokens: list[int] = []
        self._places: dict[tuple[int, int], list[int]] = {}  # (a, b) -> every i with tokens[i-1:i+1] == [a, b]
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        own, places = self.tokens, self._places
        for token in tokens:
            if own:
                places.setdefault((own[-1], token), []).append(len(own))
            own.append(token)

    def drop_oldest(self, count: int) -> None:
        """Forget the first `count` tokens (the index is rebuilt: rare, and linear)."""
        kept = self.tokens[count:]
        self.tokens, self._places = [], {}
        self.extend(kept)

    def continuation(self, query: Sequence[int], limit: int) -> tuple[int, list[int]]:
        """(match length, up to `limit` tokens after it) for the place whose preceding tokens match the end of
        `query` the longest, among the most recent places that match at least MIN_MATCH; (0, []) if none."""
        if len(query) < MIN_MATCH or limit < 1:
            return 0, []
        places = self._places.get((query[-2], query[-1]))
        if not places:
            return 0, []
        tokens, best, best_length = self.tokens, -1, 0
        for place in reversed(places[-CANDIDATES:]):
            if place + 1 >= len(tokens) or tokens[place + 1] == SEPARATOR:  # the query itself, or nothing follows
                continue
            length = MIN_MATCH
            while (length < LONGEST_MEASURED and length < len(query) and place - length >= 0
                   and tokens[place - length] == query[-1 - length]):
                length += 1
            if length > best_length:
                best, best_length = place, length
        if best < 0:
            return 0, []
        follows = tokens[best + 1: best + 1 + limit]
        if SEPARATOR in follows:
            follows = follows[:follows.index(SEPARATOR)]
        return best_length, follows


class DraftStore:
    """Recent replies of every sequence, the last STORE_TOKENS tokens: an agent's next reply repeats its
    earlier ones, and other conversations' (a sub-agent's) as well."""

    def __init__(self, capacity: int = STORE_TOKENS):
        self.capacity = capacity
        self.index = TokenIndex()

    def add(self, reply: Sequence[int]) -> None:
        if not reply:
            return
        self.index.extend([*reply, SEPARATOR])
        if len(self.index.tokens) > self.capacity:  # keep the newest half (a reply longer than that, its end)
            self.index.drop_oldest(len(self.index.tokens) - self.capacity // 2)


class Drafter:
    """One sequence's drafts: where they come from and how long they may be."""

    def __init__(self, context: Sequence[int], store: DraftStore | None, max_draft: int):
        self.index = TokenIndex(context)
        self.store, self.max_draft = store, max_draft
        self.limit = 1  # tokens the next draft may hold
        self._wait = 0  # steps left without drafting
        self._misses = 0  # drafts rejected outright in a row
        self.drafted = self.accepted = 0  # totals, for the access line

    def propose(self, history: Sequence[int], room: int) -> list[int]:
        """A draft of at most `room` tokens to follow `history` (the sequence's tokens so far)."""
        self.index.extend(history[len(self.index.tokens):])
        if self._wait:
            self._wait -= 1
            return []
        limit = min(self.limit, room)
        if limit < 1:
            return []
        draft: list[int] = []
        while len(draft) < limit:  # a place near the end (text that repeats itself) runs out: look again from there
            more = self._continuation(history[-LONGEST_MEASURED:] + draft, limit - len(draft))
            if not more:
                break
            draft += more
        return draft

    def _continuation(self, query: list[int], limit: int) -> list[int]:
        """What follows the longest match of query's end: in the sequence's own tokens, else in recent replies."""
        length, draft = self.index.continuation(query, limit)
        if self.store is not None and len(draft) < limit:
            stored_length, stored = self.store.index.continuation(query, limit)
            if stored_length > length or (stored_length == length and len(stored) > len(draft)):
                draft = stored
        return draft

    def verified(self, drafted: int, accepted: int) -> None:
        """The step checked `drafted` tokens and the first `accepted` of them were right."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.limit, self._misses = min(self.max_draft, 2 * self.limit), 0
        elif accepted:
            self.limit, self._misses = max(1, accepted), 0
        else:
            self._misses += 1
            self.limit, self._wait = 1, min(MAX_WAIT, 2 ** self._misses - 1)
