"""Draft tokens for speculative decoding, taken from the text itself (prompt lookup).

A decoded token costs a pass over the weights and, in a cluster, a network round per layer; a
chunk of tokens costs about the same. Text repeats itself — code being edited, names, quoted
passages, a chat's earlier turns — so the last few tokens often occurred before, and what followed
them then is a good guess for what follows now (llama.cpp's `--spec-type ngram-*`, vLLM's
`[ngram]`, transformers' `prompt_lookup_num_tokens`). The engine verifies every guess in one
chunk and keeps what the model itself would have produced (coordinator.generation).

Guessing wrong is not free: a chunk reads the experts of every token in it. So the drafter
adapts: a round whose drafts were all rejected halves what it proposes, a fully accepted one
raises it again, and after repeated failures it pauses for a growing number of rounds before it
tries a single token again, which keeps the cost of text that never repeats to a few percent.
"""
from __future__ import annotations

from dataclasses import dataclass


# The CLI's --draft: see the README ("Speculative decoding") for why it is on by default.
DEFAULT_DRAFT = 4


@dataclass(frozen=True)
class DraftParams:
    """max_tokens: most drafts verified in one round (0 = no speculation); an n-gram of between
    ngram_min and ngram_max tokens (longest first) must match for a draft to be proposed."""
    max_tokens: int = 0
    ngram_min: int = 2
    ngram_max: int = 4

    # A verification chunk is the current token and its drafts. Up to 15 tokens (fewer than a
    # matrix tile's 16) each get the bits they would get decoded one by one, which makes greedy
    # speculation exact (the native bf16 matmul; KVCache.RING_SLACK).
    MAX_DRAFT = 14

    def __post_init__(self):
        if not 0 <= self.max_tokens <= self.MAX_DRAFT:
            raise ValueError(f"draft tokens must be in [0, {self.MAX_DRAFT}], got {self.max_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"draft n-gram sizes must satisfy 1 <= MIN <= MAX, got {self.ngram_min}:{self.ngram_max}")

    @staticmethod
    def parse_ngram(text: str) -> tuple[int, int]:
        """'MIN:MAX' (or one number for both) -> (min, max)."""
        parts = text.split(":")
        try:
            if len(parts) <= 2:
                return int(parts[0]), int(parts[-1])
        except ValueError:
            pass
        raise ValueError(f"expected MIN:MAX (for example 2:4), got {text!r}")


class NgramDrafter:
    """Prompt lookup over a growing token history, with an index of the last occurrence of every
    n-gram (so a proposal costs a few dictionary lookups however long the context), and the
    adaptive draft length described in the module docstring."""

    PAUSE_FIRST, PAUSE_MAX = 2, 64  # rounds without drafting after a failure streak

    def __init__(self, params: DraftParams, history: list[int] | None = None):
        self.params = params
        self.history: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its last occurrence
        self.length = params.max_tokens  # drafts to propose next
        self.pause = 0  # rounds left without drafting
        self.next_pause = self.PAUSE_FIRST
        for token in history or ():
            self.push(token)

    def push(self, token: int) -> None:
        """A token of the text (prompt or accepted output); never a rejected draft."""
        h = self.history
        for n in range(self.params.ngram_min, self.params.ngram_max + 1):
            if len(h) >= n:
                self.follows[tuple(h[-n:])] = len(h)
        h.append(int(token))

    def lookup(self, limit: int) -> list[int]:
        """What followed the last occurrence of the longest matching suffix, up to limit tokens."""
        h = self.history
        for n in range(self.params.ngram_max, self.params.ngram_min - 1, -1):
            if len(h) < n:
                continue
            start = self.follows.get(tuple(h[-n:]))
            if start is not None:
                return h[start:start + limit]
        return []

    def propose(self, limit: int) -> list[int]:
        """Drafts to verify after the last pushed token (at most limit: the tokens left to generate)."""
        if self.params.max_tokens == 0 or limit <= 0:
            return []
        if self.pause > 0:
            self.pause -= 1
            return []
        return self.lookup(min(self.length, limit))

    def feedback(self, drafted: int, accepted: int) -> None:
        """How the last proposal fared: adapt the next length (see the module docstring)."""
        if drafted == 0:
            return
        if accepted == drafted:
            self.length = min(self.params.max_tokens, self.length + 1)
            self.next_pause = self.PAUSE_FIRST
        elif accepted == 0:
            if drafted <= 1:
                self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, self.PAUSE_MAX)
            self.length = max(1, drafted // 2)
        else:
            self.length = max(1, accepted + 1)
