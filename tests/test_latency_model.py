"""The round latency model (coordinator/latency.py) is plain arithmetic: checked on cases whose
answers are known by hand."""
import itertools

import pytest

from coordinator import latency as lm

SHAPE = lm.Shape(layers=24, experts=32, top_k=4, hidden=2880)


def test_expected_union_matches_counting_every_choice():
    E, k = 6, 2
    subsets = list(itertools.combinations(range(E), k))
    for T in (1, 2, 3):
        exact = sum(len(set().union(*c)) for c in itertools.product(subsets, repeat=T)) / len(subsets) ** T
        assert lm.expected_union(E, k, T) == pytest.approx(exact)


def test_a_round_adds_the_slowest_node_of_every_layer():
    compute = lm.Compute(fixed_s=1e-4, per_expert_s=2e-4, per_pair_s=1e-5)
    fast = lm.Node(lm.Link(rtt_s=3e-3), compute, overhead_s=5e-4, share=0.5)
    slow = lm.Node(lm.Link(rtt_s=3e-3, rate_bytes_s=25e6), compute, overhead_s=5e-4, share=0.5)
    # one token: 2 of the 4 experts and 2 pairs on each node; 2880 values in, 2 x 2880 back
    wire = (2880 + 2 * 2880) * 2.125 + 16
    one_layer = 3e-3 + 5e-4 + 1e-4 + 2 * 2e-4 + 2 * 1e-5
    assert lm.cluster_round_seconds(SHAPE, 0.01, [fast, slow], 1) == pytest.approx(0.01 + 24 * (one_layer + wire / 25e6))
    assert lm.cluster_round_seconds(SHAPE, 0.01, [fast, slow, lm.Node(lm.Link(1.0), compute, 0, 0.0)], 1) == \
        pytest.approx(0.01 + 24 * (one_layer + wire / 25e6))  # a node hosting nothing is never waited for


def test_a_chunk_pays_the_link_once_and_the_union_of_its_experts():
    compute = lm.Compute(per_expert_s=1e-3)
    node = lm.Node(lm.Link(rtt_s=5e-3), compute, overhead_s=0.0, share=1.0)
    one, five = (lm.cluster_round_seconds(SHAPE, 0.0, [node], T) for T in (1, 5))
    union5 = 32 * (1 - (28 / 32) ** 5)
    assert five - one == pytest.approx(24 * (union5 - 4) * 1e-3)
    # every draft accepted: 5 tokens per round; none: 1 token for the price of the chunk
    assert lm.decode_tps(five, 5) > lm.decode_tps(one, 1) > lm.decode_tps(five, 1)
    assert lm.single_round_seconds(SHAPE, 0.02, compute, 1) == pytest.approx(0.02 + 24 * 4e-3)
