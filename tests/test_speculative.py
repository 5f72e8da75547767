"""Speculative decoding (issue 19): a chunk of tokens forwarded at the end of a sequence and rolled
back, prompt-lookup drafts, and the guarantee that speculation changes nothing but the speed —
the same tokens at temperature 0 (single device and cluster), the same distribution when sampling."""
import numpy as np
import pytest

from coordinator import Engine, cluster
from coordinator.drafting import DraftParams, NgramDrafter
from coordinator.sampling import SamplingParams, fast_distribution, verify_draft
from expert_node.checkpoint import Checkpoint

GREEDY = SamplingParams(temperature=0.0)


def assert_frequencies(counts: np.ndarray, p: np.ndarray) -> None:
    """Every count within 5 standard deviations of its expectation (and none outside p's support)."""
    n = counts.sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma + 1), (counts, n * p)


class Oracle:
    """Drafts from a known continuation (every draft right), or from a fixed wrong token."""

    def __init__(self, continuation: list[int], k: int):
        self.continuation, self.k, self.seen = continuation, k, 0
        self.feedbacks = []

    def push(self, token: int) -> None:
        self.seen += 1

    def propose(self, limit: int) -> list[int]:
        return self.continuation[self.seen:self.seen + min(self.k, limit)]

    def feedback(self, drafted: int, accepted: int) -> None:
        self.feedbacks.append((drafted, accepted))


def repetitive_prompt(n: int = 24, repeats: int = 3) -> list[int]:
    return [int(t) for t in np.random.default_rng(1).integers(0, 1000, n)] * repeats


@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_chunk_then_rollback_then_chunk_equals_a_fresh_run(tiny_dir, precision):
    """Across the sliding layers' ring edge (window 8 + slack 16 on the tiny model): a rolled-back
    chunk leaves no trace (bit for bit on the native path), and the result is the model's."""
    engine = Engine.load(tiny_dir, precision=precision)
    model = engine.model
    rng = np.random.default_rng(2)
    prompt, rejected, kept = (rng.integers(0, 1000, n) for n in (21, 7, 6))
    cache, fresh = model.new_cache(), model.new_cache()
    model.forward(prompt, cache)
    model.forward(rejected, cache)
    cache.truncate(len(prompt))
    got = [model.forward(kept, cache)]
    assert cache.length == len(prompt) + len(kept)
    model.forward(prompt, fresh)
    want = [model.forward(kept, fresh)]
    for _ in range(3):  # and on past the edge, decoding after the rolled-back chunk
        token = np.array([np.argmax(got[-1][-1])])
        got.append(model.forward(token, cache))
        want.append(model.forward(token, fresh))
        kept = np.append(kept, token)
    got, want = np.concatenate(got), np.concatenate(want)
    if precision == "reference":
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    else:
        assert np.array_equal(got, want)
    whole = engine.logits(np.concatenate([prompt, kept]))[len(prompt):]
    np.testing.assert_allclose(got, whole, atol=1e-4 if precision == "reference" else 2e-3, rtol=0)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_verified_chunk_gives_each_token_the_bits_of_decoding_it_alone(tiny_dir, precision):
    engine = Engine.load(tiny_dir, precision=precision)
    model = engine.model
    ids = np.random.default_rng(3).integers(0, 1000, 60)
    one_by_one, chunked = model.new_cache(), model.new_cache()
    model.forward(ids[:20], one_by_one)
    model.forward(ids[:20], chunked)
    alone = np.concatenate([model.forward(ids[i:i + 1], one_by_one) for i in range(20, 60)])
    together = np.concatenate([model.forward(ids[i:i + 10], chunked) for i in range(20, 60, 10)])
    assert np.array_equal(alone, together)


def test_truncation_is_bounded_by_the_ring_slack(tiny_dir):
    engine = Engine.load(tiny_dir, precision="fast")
    cache = engine.model.new_cache()
    engine.model.forward(np.arange(40), cache)
    with pytest.raises(ValueError, match="at most 16"):
        cache.truncate(40 - 17)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(41)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_greedy_speculation_yields_the_same_tokens(tiny_dir, precision):
    engine = Engine.load(tiny_dir, precision=precision)
    prompt = repetitive_prompt(24, 1)
    # the prompt again after its own continuation: the lookup then proposes that continuation
    prompt += [s.token for s in engine.stream(prompt, 30, GREEDY)] + prompt
    plain = engine.stream(prompt, 80, GREEDY)
    tokens = [s.token for s in plain]
    assert plain.stats.rounds == 79 and plain.stats.drafted == 0
    lookup = engine.stream(prompt, 80, GREEDY, draft=DraftParams(4, 1, 3))
    assert [s.token for s in lookup] == tokens
    assert lookup.stats.drafted > 0
    oracle = engine.stream(prompt, 80, GREEDY, drafter=Oracle(tokens, 4))
    assert [s.token for s in oracle] == tokens
    assert oracle.stats.accepted == oracle.stats.drafted == 79 - oracle.stats.rounds
    assert oracle.stats.rounds == 16 and oracle.stats.tokens_per_round == pytest.approx(79 / 16)
    wrong = engine.stream(prompt, 30, GREEDY, drafter=Oracle([(t + 1) % 1000 for t in tokens], 3))
    assert [s.token for s in wrong] == tokens[:30] and wrong.stats.accepted == 0


def test_greedy_speculation_over_a_cluster_yields_the_same_tokens(tiny_dir, start_node):
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(2)]
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [n.address for n in nodes], progress=False)
    remote = Engine.load(tiny_dir, precision="fast", experts=experts)
    local = Engine.load(tiny_dir, precision="fast")
    prompt = repetitive_prompt()
    tokens = [s.token for s in local.stream(prompt, 40, GREEDY)]
    oracle = remote.stream(prompt, 40, GREEDY, drafter=Oracle(tokens, 4))
    assert [s.token for s in oracle] == tokens and oracle.stats.rounds == 8
    assert list(remote.generate(prompt, 40, temperature=0, draft=4, draft_ngram=(1, 3))) == tokens
    experts.close()


def test_a_draft_is_kept_or_replaced_with_the_models_probabilities():
    """verify_draft's output is distributed as p whatever the draft (20k draws each)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(12).astype(np.float32) * 1.5
    for params in (SamplingParams(1.0), SamplingParams(0.7, top_k=6), SamplingParams(1.3, top_p=0.8)):
        ids, w = fast_distribution(logits, params)
        p = np.zeros(12)
        p[np.arange(12) if ids is None else ids] = w / w.sum()
        for draft in (int(np.argmax(p)), int(np.argsort(p)[-3]), int(np.argmin(p))):
            draws = np.bincount([verify_draft(logits, draft, params, rng) for _ in range(20_000)], minlength=12)
            assert_frequencies(draws, p)


def test_speculative_sampling_keeps_the_models_distribution(tiny_dir):
    """The first two sampled tokens after a prompt, the second always drafted (a token often
    right): the pairs' frequencies match the model's own p(t1) p(t2 | t1), from its logits."""
    engine = Engine.load(tiny_dir, precision="fast")
    prompt = repetitive_prompt(8, 1)
    params = dict(temperature=1.0, top_k=3)
    first = engine.logits(prompt)[-1]
    ids1, w1 = fast_distribution(first, SamplingParams(**params))
    p = {}
    for t1, q1 in zip(ids1, w1 / w1.sum()):
        ids2, w2 = fast_distribution(engine.logits(prompt + [int(t1)])[-1], SamplingParams(**params))
        for t2, q2 in zip(ids2, w2 / w2.sum()):
            p[(int(t1), int(t2))] = q1 * q2
    likely = max(p, key=p.get)[1]  # a draft that is often right
    counts = dict.fromkeys(p, 0)
    drafted = 0
    for seed in range(2000):
        generation = engine.stream(prompt, 3, SamplingParams(seed=seed, **params), drafter=Oracle([0, likely], 1))
        counts[tuple(s.token for s in generation)[:2]] += 1
        drafted += generation.stats.drafted
    assert drafted == 2000
    keys = list(p)
    assert_frequencies(np.array([counts[k] for k in keys]), np.array([p[k] for k in keys]))


def test_lookup_proposes_what_followed_the_longest_match():
    drafter = NgramDrafter(DraftParams(3, 1, 3), [5, 6, 7, 8, 9, 1, 6, 7])
    assert drafter.propose(10) == [8, 9, 1]  # "6 7" last occurred before 8 9 1
    assert drafter.propose(2) == [8, 9]  # never past the tokens left to generate
    drafter.push(4)
    assert drafter.propose(10) == []  # "4", "7 4", "6 7 4" never occurred


def test_drafts_that_keep_failing_pause_drafting():
    drafter = NgramDrafter(DraftParams(8, 1, 1), [1, 2, 1])  # "1" was followed by [2, 1]
    lengths = []
    for _ in range(40):
        proposed = drafter.propose(100)
        lengths.append(len(proposed))
        drafter.feedback(len(proposed), 0)
    assert lengths[:10] == [2, 1, 0, 0, 1, 0, 0, 0, 0, 1]  # halved, then pauses of 2, 4, 8, ... rounds
    assert sum(lengths) == 7 and lengths[-10:].count(0) == 9
    drafter.feedback(1, 1)
    assert drafter.length == 2


def test_draft_flags_are_checked():
    with pytest.raises(ValueError, match="draft tokens"):
        DraftParams(15)
    with pytest.raises(ValueError, match="MIN <= MAX"):
        DraftParams(4, 3, 2)
    assert DraftParams.parse_ngram("2:5") == (2, 5) and DraftParams.parse_ngram("3") == (3, 3)
    with pytest.raises(ValueError, match="MIN:MAX"):
        DraftParams.parse_ngram("a:b")


def test_cli_draft_flags(tiny_dir):
    import json
    import subprocess

    from support import MOEMESH, TESTS

    def generate(*flags):
        proc = subprocess.run([*MOEMESH, "generate", "-m", str(tiny_dir), "--tokens", "5,6,7,5,6,7,5,6", "-n", "12",
                               "--temp", "0", "--json", *flags], capture_output=True, text=True, timeout=120, cwd=TESTS)
        return proc

    plain, drafted = generate("--draft", "0"), generate("--draft", "6", "--draft-ngram", "1:2")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert json.loads(drafted.stdout) == json.loads(plain.stdout)
    bad = generate("--draft-ngram", "3:1")
    assert bad.returncode == 2 and "1 <= MIN <= MAX" in bad.stderr and "Traceback" not in bad.stderr
