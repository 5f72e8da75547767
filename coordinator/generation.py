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

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts


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
    NgramDrafter's push, propose and feedback: benchmarks use an oracle).

    Iterating drives the steps itself, one forward pass each. A batch scheduler
    (coordinator.batching) drives many generations instead: start(), then for each pass
    next_input() -> (ids, all_logits), the logits of those ids through the engine, take(logits) ->
    the Steps they complete, until `finished`. Both give a sequence the same numbers."""

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
    finished: bool = False

    def __iter__(self) -> Iterator[Step]:
        tracer = self.engine.model.tracer
        self.start()
        with tracer.span("prefill", track="steps", tokens=self.stats.prompt_tokens):
            while self.prefilling:
                ids, all_logits = self.next_input()
                steps = self.take(self.engine.forward(ids, self.cache, all_logits))
        yield from steps
        while not self.finished:
            ids, all_logits = self.next_input()
            with tracer.span("decode", track="steps", position=int(self.cache.length), drafts=len(ids) - 1):
                logits = self.engine.forward(ids, self.cache, all_logits)
            yield from self.take(logits)

    def start(self) -> None:
        """Check the prompt and take a cache (a conversation's, holding a prefix, or a fresh one)."""
        engine, model = self.engine, self.engine.model
        ids = np.asarray(self.prompt_ids, np.int64)
        limit = engine.context_length
        if ids.size == 0:
            raise ValueError("the prompt is empty")
        if ids.size >= limit:
            raise ContextLimitError(f"the prompt has {ids.size} tokens; the context holds {limit}")
        # -1: until a stop token or the context is full (llama.cpp's -n -1)
        self._budget = limit - ids.size if self.max_new_tokens < 0 else min(self.max_new_tokens, limit - ids.size)
        self._stops = set(self.stop_ids)
        self._rng = np.random.default_rng(self.params.seed)
        self._detok = IncrementalDetokenizer(self.tokenizer)
        if self.conversation is None:
            self.cache, cached = model.new_cache(), 0
        else:
            self.cache, cached = self.conversation.start(model, self.prompt_ids)
        self.stats = GenerationStats(prompt_tokens=int(ids.size) - cached, cached_tokens=cached)
        self._unfed = ids[cached:]  # prompt tokens not in the cache yet
        self._t0 = time.perf_counter()
        self._t_first = None
        self._drafts: list[int] = []
        self._chosen: list[int] = []  # the last token yielded is not in the cache yet
        if self.drafter is None and self.draft.max_tokens > 0:
            self.drafter = NgramDrafter(self.draft, self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self._unfed.size > 0

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet forwarded."""
        return int(self._unfed.size)

    def next_input(self) -> tuple[np.ndarray, bool]:
        """The ids of the next forward pass and whether it needs logits at every position: the
        prompt's next chunk, or the last token with the drafts proposed after it."""
        if self.prefilling:
            return self._unfed[:PREFILL_CHUNK], False
        drafter = self.drafter
        self._drafts = drafter.propose(self._budget - self.stats.generated_tokens - 1) if drafter is not None else []
        return np.array([self._chosen[-1], *self._drafts], np.int64), bool(self._drafts)

    def take(self, logits: np.ndarray) -> list[Step]:
        """The Steps that the logits of next_input()'s ids complete (none while prefilling)."""
        tracer, stats = self.engine.model.tracer, self.stats
        if self.prefilling:
            self._unfed = self._unfed[PREFILL_CHUNK:]
            if self.prefilling:
                return []
            if self.conversation is not None:
                self.conversation.remember(self.prompt_ids)
            stats.prompt_seconds = time.perf_counter() - self._t0
            with tracer.span("sample"):
                return self._emit([sample(logits[-1], self.params, self._rng)])
        drafts = self._drafts
        with tracer.span("sample"):
            chosen, accepted = self.verify(logits, drafts, self._stops, self._rng)
        if drafts:
            self.cache.truncate(self.cache.length - len(drafts) + accepted)
            self.drafter.feedback(len(drafts), accepted)
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        return self._emit(chosen)

    def _emit(self, chosen: list[int]) -> list[Step]:
        steps, stats = [], self.stats
        for token in chosen:
            now = time.perf_counter()
            if self._t_first is None:
                self._t_first = now
                stats.time_to_first_token = now - self._t0
            stats.generated_tokens += 1
            stats.decode_seconds = now - self._t_first
            finish = "stop" if token in self._stops else ("length" if stats.generated_tokens == self._budget else None)
            stats.finish_reason = finish
            steps.append(Step(token, self._detok.push(token), finish))
            if finish:
                self.finished = True
                return steps
            if self.drafter is not None:
                self.drafter.push(token)
        self._chosen = chosen
        return steps

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
