"""Continuous batching (issue 20): sequences that share forward passes get exactly the tokens they
get alone — greedy, sampled with a seed, with speculative drafts, joining while others decode,
with a prompt longer than a prefill chunk — and a cancelled request frees its slot."""
import queue

import numpy as np
import pytest

from support import GREEDY, Collector, alone, prompts, run_batched

from coordinator import Engine
from coordinator.batching import Scheduler, SchedulerFull
from coordinator.drafting import DraftParams
from coordinator.generation import PREFILL_CHUNK
from coordinator.sampling import SamplingParams


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_batched_sequences_equal_their_lone_runs(tiny_dir, precision):
    engine = Engine.load(tiny_dir, precision=precision)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    jobs = [(p, 10 + 2 * i, GREEDY if i % 2 == 0 else sampled, DraftParams(4) if i == 1 else None)
            for i, p in enumerate(prompts(5))]
    outs = run_batched(engine, jobs, parallel=4)  # the fifth joins when a slot frees up
    for (prompt, n, params, draft), c in zip(jobs, outs):
        assert c.error is None
        assert c.tokens == alone(engine, prompt, n, params, draft)


def test_rows_beyond_a_tile_group_keep_their_numbers(wide_dir):
    """Three 7-token chunks after their prompts in one pass: more rows than the bf16 tiles' group
    of 16, yet every sequence's logits are the bits of its chunk forwarded alone."""
    engine = Engine.load(wide_dir, precision="fast")
    seqs = prompts(3, length=20, seed=3)
    chunks = prompts(3, length=7, seed=4)

    def prefilled(prompt):
        cache = engine.model.new_cache()
        engine.forward(np.array(prompt), cache, all_logits=False)
        return cache

    batched = engine.forward_batch([(np.array(c[:7]), prefilled(p), True) for p, c in zip(seqs, chunks)])
    for p, c, got in zip(seqs, chunks, batched):
        assert np.array_equal(got, engine.forward(np.array(c[:7]), prefilled(p), all_logits=True))


def test_short_prompts_start_together_with_their_lone_numbers(wide_dir):
    """Prompts shorter than a matrix tile are forwarded in one pass (with whoever decodes), and
    still give every request the tokens it gets alone; a longer prompt gets a pass of its own."""
    engine = Engine.load(wide_dir, precision="fast")
    jobs = [(p, 6, GREEDY, None) for p in prompts(3, length=5, seed=8)] + [(prompts(1, length=40, seed=9)[0], 6, GREEDY, None)]
    passes = []
    forward_batch = engine.forward_batch
    engine.forward_batch = lambda batch: passes.append([len(ids) for ids, _, _ in batch]) or forward_batch(batch)
    outs = run_batched(engine, jobs, parallel=4)
    engine.forward_batch = forward_batch
    assert passes[0] == [5, 8, 11] and passes[1] == [40]
    for (prompt, n, params, draft), c in zip(jobs, outs):
        assert c.error is None
        assert c.tokens == alone(engine, prompt, n, params, draft)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_dir):
    engine = Engine.load(tiny_dir, precision="fast")
    long_prompt = prompts(1, length=PREFILL_CHUNK + 200, seed=5)[0]
    short = prompts(1, seed=6)[0]
    scheduler = Scheduler(engine, parallel=2)
    try:
        first, second = Collector(), Collector()
        scheduler.submit(engine.stream(short, 40, GREEDY), first)
        scheduler.submit(engine.stream(long_prompt, 5, GREEDY), second)
        assert first.done.wait(120) and second.done.wait(120)
    finally:
        scheduler.close()
    assert first.tokens == alone(engine, short, 40)
    assert second.tokens == alone(engine, long_prompt, 5)


def test_cancel_frees_the_slot_and_a_full_scheduler_refuses(tiny_dir):
    engine = Engine.load(tiny_dir, precision="fast")
    scheduler = Scheduler(engine, parallel=1, waiting=1)
    try:
        steps: queue.Queue = queue.Queue()
        running = scheduler.submit(engine.stream(prompts(1)[0], -1, GREEDY), steps.put)
        assert steps.get(timeout=60)  # generating
        waiting = Collector()
        scheduler.submit(engine.stream(prompts(1, seed=1)[0], 3, GREEDY), waiting)
        with pytest.raises(SchedulerFull):
            scheduler.submit(engine.stream(prompts(1, seed=2)[0], 3, GREEDY), Collector())
        running.cancel()
        assert waiting.done.wait(60) and len(waiting.tokens) == 3
        assert scheduler.busy == (0, 0)
    finally:
        scheduler.close()


def test_requests_arriving_together_at_an_idle_scheduler_share_the_first_step(wide_dir):
    """Clients that start at once reach the server a few milliseconds apart: an idle scheduler
    gathers them for ADMIT_WINDOW_S, so they share one prefill step instead of the later ones
    waiting through the first one's (submitted here one after the other, the lock not held)."""
    engine = Engine.load(wide_dir, precision="fast")
    passes = []
    forward_batch = engine.forward_batch
    engine.forward_batch = lambda batch: passes.append(len(batch)) or forward_batch(batch)
    scheduler = Scheduler(engine, parallel=4)
    try:
        outs = [Collector() for _ in range(3)]
        for p, c in zip(prompts(3, length=5, seed=10), outs):
            scheduler.submit(engine.stream(p, 4, GREEDY), c)
        assert all(c.done.wait(120) for c in outs)
    finally:
        scheduler.close()
        engine.forward_batch = forward_batch
    assert passes[0] == 3 and all(c.error is None and len(c.tokens) == 4 for c in outs)
