"""The placement planner, a pure function: coverage, memory limits, balance, replicas."""
import pytest

from coordinator.placement import NodeCapacity, Placement, PlacementError, plan_placement

MB = 1_000_000


def test_every_expert_placed_once_and_spread_per_layer():
    p = plan_placement(4, 8, 10 * MB, [NodeCapacity("a", 1000 * MB), NodeCapacity("b", 1000 * MB)])
    assert all(len(hs) == 1 for layer in p.hosts for hs in layer)
    assert len(p.pieces_of("a")) == len(p.pieces_of("b")) == 16
    for layer in p.hosts:  # each layer's experts split over both nodes
        assert sum(hs == ("a",) for hs in layer) == 4


def test_speed_weights_the_share_and_memory_caps_it():
    p = plan_placement(2, 30, 10 * MB, [NodeCapacity("fast", 10_000 * MB, 3.0), NodeCapacity("slow", 10_000 * MB, 1.0)])
    assert len(p.pieces_of("fast")) == 45 and len(p.pieces_of("slow")) == 15
    p = plan_placement(2, 30, 10 * MB, [NodeCapacity("fast", 100 * MB, 3.0), NodeCapacity("slow", 10_000 * MB, 1.0)])
    assert len(p.pieces_of("fast")) == 10 and len(p.pieces_of("slow")) == 50


def test_replicas_land_on_distinct_nodes():
    nodes = [NodeCapacity(n, 10_000 * MB) for n in "abc"]
    p = plan_placement(3, 4, 10 * MB, nodes, replicas=2)
    assert all(len(set(hs)) == 2 for layer in p.hosts for hs in layer)
    primaries = [hs[0] for layer in p.hosts for hs in layer]
    assert sorted(primaries.count(n) for n in "abc") == [4, 4, 4]  # every node serves a share
    with pytest.raises(PlacementError, match="3 replicas need at least 3 nodes"):
        plan_placement(3, 4, 10 * MB, nodes[:2], replicas=3)


def test_not_enough_memory_is_explained():
    with pytest.raises(PlacementError, match="not enough memory: 64 pieces of 10.0 MB needed, the nodes hold 20"):
        plan_placement(8, 8, 10 * MB, [NodeCapacity("a", 100 * MB), NodeCapacity("b", 100 * MB)])
    with pytest.raises(PlacementError, match="no expert nodes"):
        plan_placement(1, 1, MB, [])


def test_plan_is_deterministic_and_round_trips():
    nodes = [NodeCapacity("x", 500 * MB, 2.0), NodeCapacity("y", 300 * MB, 1.0)]
    p = plan_placement(5, 6, 10 * MB, nodes)
    assert p == plan_placement(5, 6, 10 * MB, nodes)
    assert Placement.from_dict(p.to_dict()) == p
