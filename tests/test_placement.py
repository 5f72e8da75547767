"""The placement planner, a pure function: coverage, memory limits, balance, replicas."""
import pytest

from coordinator.placement import NodeCapacity, Placement, PlacementError, plan_placement, repair_placement

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


def test_repair_restores_replicas_on_live_nodes_and_keeps_the_dead_last():
    nodes = [NodeCapacity(n, 10_000 * MB) for n in "abc"]
    p = plan_placement(2, 6, 10 * MB, nodes, replicas=2)
    r = repair_placement(p, [nodes[0], nodes[2]], {"b"}, 10 * MB, replicas=2)
    for before, after in zip(p.hosts, r.hosts):
        for hs, new in zip(before, after):
            live = [h for h in hs if h != "b"]
            assert list(new[:len(live)]) == live  # serving order of live hosts unchanged
            assert len([h for h in new if h != "b"]) == 2 and set(new) - {"b"} <= {"a", "c"}
            assert ("b" in hs) == (new[-1] == "b")  # the dead node stays, last, for when it returns
    assert not r.pieces_of("b") or set(r.pieces_of("b")) == set(p.pieces_of("b"))


def test_repair_without_replicas_moves_orphans_within_memory():
    nodes = [NodeCapacity("a", 10 * 10 * MB), NodeCapacity("b", 1000 * MB), NodeCapacity("c", 1000 * MB)]
    p = plan_placement(2, 12, 10 * MB, nodes)  # one host per piece: 8 pieces each
    r = repair_placement(p, [nodes[0], nodes[2]], {"b"}, 10 * MB, replicas=1)
    orphans = p.pieces_of("b")
    moved_to = [r.primary(l, e) for l, e in orphans]
    assert moved_to.count("a") == 2 and moved_to.count("c") == 6  # a is full at 10 pieces; then c
    assert len(r.pieces_of("a")) == 10
    r2 = repair_placement(p, [nodes[0]], {"b", "c"}, 10 * MB, replicas=1)
    assert sum(r2.primary(l, e) == "a" for l in range(2) for e in range(12)) == 10  # no room: rest stays
