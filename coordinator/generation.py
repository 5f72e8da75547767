"""The one streaming generator that the CLI, chat, profiler and benchmarks all consume.

`Generation` prefills a prompt (in chunks), then decodes in rounds, yielding a `Step` per
token: the id, the text it completes (UTF-8 safe across tokens), and the finish reason on the last
one. A round forwards the last chosen token and, with speculation on, the drafts that
coordinator.drafting proposes after it, in one chunk: each draft is kept or replaced by
sampling.verify_draft (so the output is distributed exactly as without drafts, and identical at
temperature 0), the cache is truncated to what was kept, and a round whose drafts all held adds
one more token from the last logits. Timings accumulate in `Generation.stats` as it runs (prefill
and decode rates, time to first token, drafts), so a consumer that stops early still has correct
figures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .drafting import DraftParams, NgramDrafter
from .sampling import SamplingParams, sample, verify_draft


class ContextLimitError(ValueError):
    """The prompt does not fit the model's context."""


class NonFiniteError(ValueError):
    """NaN or Inf where the model's numbers must be finite (the engine says which weights)."""


@dataclass(frozen=True)
class Step:
    token: int
    text: str  # text completed by this token ("" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max tokens or context), None


class ConversationCache:
    """The KV cache of a conversation between turns. A chat prompt re-renders the whole history,
    and each turn's prompt is a prefix of the next one's (what follows it — the reasoning and the
    `<|return|>` — is rendered differently in history), so the state right after the last prompt
    is kept and the next turn prefills only what is new, as ollama and llama.cpp's server do."""

    def __init__(self):
        self.cache = None
        self.ids: list[int] = []
        self.state = None

    def start(self, model, ids: list[int]):
        """A cache holding a prefix of ids (restored) or a fresh one; returns (cache, prefix length)."""
        n = len(self.ids)
        if self.cache is not None and 0 < n < len(ids) and ids[:n] == self.ids:
            self.cache.restore(self.state)
            return self.cache, n
        self.cache, self.ids, self.state = model.new_cache(), [], None
        return self.cache, 0

    def remember(self, ids: list[int]) -> None:
        self.ids, self.state = list(ids), self.cache.snapshot()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # prefilled by this generation (cached_tokens came from a previous turn)
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # time spent producing tokens after the first
    time_to_first_token: float = 0.0
    finish_reason: str | None = None
    rounds: int = 0  # forward passes after the first token, each verifying its drafts
    drafted: int = 0
    accepted: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.generated_tokens - 1) / self.rounds if self.rounds else 0.0

    def summary(self) -> str:
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        drafts = (f", drafted {self.drafted} accepted {self.accepted} ({self.tokens_per_round:.2f} tok/round)"
                  if self.drafted else "")
        return (f"prompt {self.prompt_tokens} tok{cached} @ {self.prefill_tps:.1f} tok/s, "
                f"generated {self.generated_tokens} tok @ {self.decode_tps:.1f} tok/s, "
                f"first token {self.time_to_first_token * 1e3:.0f} ms{drafts}")


class IncrementalDetokenizer:
    """Turns a growing token list into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character still waiting for its remaining bytes
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


@dataclass
class Generation:
    """Iterate to generate. `conversation` carries the KV cache between a chat's turns; `draft`
    turns speculation on (prompt lookup), or `drafter` supplies the drafts (an object with
    NgramDrafter's push, propose and feedback: benchmarks use an oracle)."""

    engine: object
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    stop_ids: Iterable[int] = ()
    tokenizer: object = None
    conversation: ConversationCache | None = None
    draft: DraftParams = field(default_factory=DraftParams)
    drafter: object = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[Step]:
        engine, model = self.engine, self.engine.model
        ids = np.asarray(self.prompt_ids, np.int64)
        limit = engine.context_length
        if ids.size == 0:
            raise ValueError("the prompt is empty")
        if ids.size >= limit:
            raise ContextLimitError(f"the prompt has {ids.size} tokens; the model's context holds {limit}")
        # -1: until a stop token or the context is full (llama.cpp's -n -1)
        budget = limit - ids.size if self.max_new_tokens < 0 else min(self.max_new_tokens, limit - ids.size)
        stops = set(self.stop_ids)
        rng = np.random.default_rng(self.params.seed)
        detok = IncrementalDetokenizer(self.tokenizer)
        if self.conversation is None:
            cache, cached = model.new_cache(), 0
        else:
            cache, cached = self.conversation.start(model, self.prompt_ids)
        self.stats = stats = GenerationStats(prompt_tokens=int(ids.size) - cached, cached_tokens=cached)
        t0 = time.perf_counter()
        with model.tracer.span("prefill", track="steps", tokens=int(ids.size) - cached):
            logits = engine.prefill(ids[cached:], cache)
        if self.conversation is not None:
            self.conversation.remember(self.prompt_ids)
        stats.prompt_seconds = time.perf_counter() - t0
        drafter = self.drafter
        if drafter is None and self.draft.max_tokens > 0:
            drafter = NgramDrafter(self.draft, self.prompt_ids)
        t_first, emitted = None, 0
        with model.tracer.span("sample"):
            chosen = [sample(logits, self.params, rng)]  # tokens to yield; the last is not in the cache yet
        while True:
            for token in chosen:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.time_to_first_token = now - t0
                emitted += 1
                stats.generated_tokens = emitted
                stats.decode_seconds = now - t_first
                finish = "stop" if token in stops else ("length" if emitted == budget else None)
                stats.finish_reason = finish
                yield Step(token, detok.push(token), finish)
                if finish:
                    return
                if drafter is not None:
                    drafter.push(token)
            current = chosen[-1]
            drafts = drafter.propose(budget - emitted - 1) if drafter is not None else []
            base = cache.length
            with model.tracer.span("decode", track="steps", position=int(base), drafts=len(drafts)):
                logits = engine.forward(np.array([current, *drafts]), cache, all_logits=bool(drafts))
            with model.tracer.span("sample"):
                chosen, accepted = self.verify(logits, drafts, stops, rng)
            if drafts:
                cache.truncate(base + 1 + accepted)
                drafter.feedback(len(drafts), accepted)
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted

    def verify(self, logits: np.ndarray, drafts: list[int], stops: set, rng) -> tuple[list[int], int]:
        """(the tokens a round yields, how many drafts held): the drafts up to the first one
        replaced (its replacement last) or up to a stop token, or all of them and one more from the
        last position."""
        chosen = []
        for row, d in zip(logits, drafts):
            kept = verify_draft(row, d, self.params, rng)
            if kept != d:
                return chosen + [kept], len(chosen)
            chosen.append(kept)
            if kept in stops:
                return chosen, len(chosen)
        return chosen + [sample(logits[len(drafts)], self.params, rng)], len(drafts)
