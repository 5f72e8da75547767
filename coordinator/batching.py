"""Continuous batching: the sequences of concurrent requests advance together, one forward pass a
step for all of them, so in a cluster one round per layer serves every sequence.

A Scheduler owns the engine on its own thread. Requests join between steps (from idle, the ones
that arrive within ADMIT_WINDOW_S of each other together). A step forwards the
next token (with its drafts) of every decoding sequence, and every prompt shorter than a matrix
tile, in one Engine.forward_batch, then one prompt chunk (PREFILL_CHUNK tokens) of the oldest
sequence still prefilling a longer prompt, so a long prompt holds the others up by one chunk a
step, never by its whole length. Each sequence keeps its own
cache and random generator and gets the numbers it would get alone (GptOssModel.forward_batch),
so at temperature 0 its output is identical to a lone run, and its prompt is chunked as a lone
run chunks it.

Not here: sharing a cached prompt prefix between requests (each request prefills its prompt).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .generation import Generation
from .models.layers import BATCH_ROWS_ALONE

# How long an idle scheduler gathers arriving requests before its first step: a burst of clients
# shares one prefill; a lone request's first token comes this much later.
ADMIT_WINDOW_S = 0.02

# A request's outputs: a list of Steps after a pass that completed any, an Exception when it
# failed, None when it ended (finished or cancelled).
Deliver = Callable[[object], None]


class SchedulerFull(RuntimeError):
    """Every slot is busy and the waiting line is full (HTTP 503)."""


@dataclass(eq=False)
class Request:
    generation: Generation
    deliver: Deliver
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (a client went away); the slot is free before the next step."""
        self.cancelled.set()


class Scheduler:
    """`parallel` sequences decode together; up to `waiting` more queue for a free slot."""

    def __init__(self, engine, parallel: int = 4, waiting: int | None = None):
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.engine, self.parallel = engine, parallel
        self.max_waiting = 4 * parallel if waiting is None else waiting
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="moemesh-batching")
        self._thread.start()

    def submit(self, generation: Generation, deliver: Deliver) -> Request:
        request = Request(generation, deliver)
        with self._wake:
            if self._closed:
                raise SchedulerFull("the server is shutting down")
            if len(self._active) + len(self._waiting) >= self.parallel + self.max_waiting:
                raise SchedulerFull(f"all {self.parallel} slots are busy and {len(self._waiting)} requests wait")
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def busy(self) -> tuple[int, int]:
        """(sequences generating, requests waiting)."""
        with self._wake:
            return len(self._active), len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for r in list(self._active) + list(self._waiting):
            r.deliver(SchedulerFull("the server is shutting down"))

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._active and not self._waiting:
                    self._wake.wait()
                if not self._active:
                    self._gather_arrivals()
                if self._closed:
                    return
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.parallel:
                    admitted.append(self._waiting.popleft())
            for r in admitted:
                self._admit(r)
            self._drop_cancelled()
            # Prompts too short for the matrix tiles get the bits of a lone prefill in any batch:
            # they ride along with the decoding sequences (four new requests start together
            # instead of one a step, and a cluster pays no extra round for them).
            short = [r for r in self._active if 0 < r.generation.prompt_left < BATCH_ROWS_ALONE]
            together = [r for r in self._active if not r.generation.prefilling] + short
            if together:
                self._step(together)
            prefilling = next((r for r in self._active if r.generation.prefilling and r not in short), None)
            if prefilling is not None:
                self._step([prefilling])

    def _gather_arrivals(self) -> None:
        """From idle, wait up to ADMIT_WINDOW_S for more requests before the first step (called
        holding _wake; submit() wakes it at each arrival). Clients that start together, which reach
        the server a few milliseconds apart, then share one prefill step: the first of four
        otherwise prefilled alone and the other three waited through its whole step (full-size
        gpt-oss-20b: 0.5 s, four clients' first tokens after 1.7 s)."""
        deadline = time.monotonic() + ADMIT_WINDOW_S
        while not self._closed and len(self._waiting) < self.parallel:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def _admit(self, r: Request) -> None:
        if r.cancelled.is_set():
            r.deliver(None)
            return
        try:
            r.generation.start()
        except ValueError as e:  # an empty prompt, or one the context cannot hold
            r.deliver(e)
            return
        with self._wake:
            self._active.append(r)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._active if r.cancelled.is_set()]:
            self._remove(r)
            r.deliver(None)

    def _remove(self, r: Request) -> None:
        with self._wake:
            self._active.remove(r)

    def _step(self, requests: list[Request]) -> None:
        inputs = [r.generation.next_input() for r in requests]
        try:
            logits = self.engine.forward_batch([(ids, r.generation.cache, all_logits)
                                                for r, (ids, all_logits) in zip(requests, inputs)])
        except Exception as e:  # noqa: BLE001 (a node lost beyond repair, a corrupt checkpoint)
            for r in requests:
                self._remove(r)
                r.deliver(e)
            return
        for r, rows in zip(requests, logits):
            steps = r.generation.take(rows)
            if steps:
                r.deliver(steps)
            if r.generation.finished:
                self._remove(r)
                r.deliver(None)
