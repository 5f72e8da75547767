"""Placement of experts on nodes: a pure function from (model shape, node capacities) to a frozen
plan. No sockets here, so every rule is unit-tested.

Rules: every (layer, expert) piece goes to `replicas` distinct nodes; no node gets more pieces than
its memory holds; work (the primary host of each piece) is shared in proportion to node speed;
pieces are dealt layer by layer so each layer's experts spread over the nodes (a token's 4
experts then tend to run in parallel). When nodes go down, `repair_placement` restores the
replica count of their pieces on the live nodes, within their memory.
Ties go to the node listed first, so the same inputs always give the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """The nodes cannot hold the model as asked."""


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    memory_bytes: int
    speed: float = 1.0  # relative compute speed (cores, or measured)


@dataclass(frozen=True)
class Placement:
    n_layers: int
    n_experts: int
    hosts: tuple[tuple[tuple[str, ...], ...], ...]  # hosts[layer][expert] = node ids, primary first

    def nodes(self) -> list[str]:
        return sorted({n for layer in self.hosts for hs in layer for n in hs})

    def pieces_of(self, node_id: str) -> list[tuple[int, int]]:
        return [(l, e) for l, layer in enumerate(self.hosts) for e, hs in enumerate(layer) if node_id in hs]

    def replicas(self) -> int:
        """The fewest hosts any piece has (0 when some piece has none)."""
        return min(len(hs) for layer in self.hosts for hs in layer)

    def primary(self, layer: int, expert: int) -> str:
        return self.hosts[layer][expert][0]

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "n_experts": self.n_experts,
                "hosts": [[list(hs) for hs in layer] for layer in self.hosts]}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(d["n_layers"], d["n_experts"], tuple(tuple(tuple(hs) for hs in layer) for layer in d["hosts"]))


def plan_placement(n_layers: int, n_experts: int, piece_bytes: int, nodes: list[NodeCapacity],
                   replicas: int = 1) -> Placement:
    if not nodes:
        raise PlacementError("no expert nodes to place the experts on")
    if replicas < 1 or replicas > len(nodes):
        raise PlacementError(f"{replicas} replicas need at least {replicas} nodes; {len(nodes)} available")
    capacity = {n.node_id: n.memory_bytes // piece_bytes for n in nodes}
    needed = n_layers * n_experts * replicas
    if sum(capacity.values()) < needed:
        raise PlacementError(
            f"not enough memory: {needed} pieces of {piece_bytes / 1e6:.1f} MB needed, the nodes hold "
            f"{sum(capacity.values())} ({', '.join(f'{k}: {v}' for k, v in capacity.items())})")
    total_speed = sum(max(n.speed, 1e-9) for n in nodes)
    target = {n.node_id: needed * max(n.speed, 1e-9) / total_speed for n in nodes}
    count = {n.node_id: 0 for n in nodes}
    primaries = {n.node_id: 0 for n in nodes}  # the host that serves a piece while all are up
    order = [n.node_id for n in nodes]
    hosts = []
    for _ in range(n_layers):
        layer = []
        for _ in range(n_experts):
            chosen: list[str] = []
            for _ in range(replicas):
                candidates = [n for n in order if n not in chosen and count[n] < capacity[n]]
                if not candidates:
                    raise PlacementError("not enough distinct nodes with free memory for every replica")
                best = min(candidates, key=lambda n: (count[n] / target[n], order.index(n)))
                chosen.append(best)
                count[best] += 1
            # Spread the primaries too, or with replicas one node would serve everything.
            first = min(chosen, key=lambda n: (primaries[n] / target[n], order.index(n)))
            primaries[first] += 1
            layer.append((first,) + tuple(n for n in chosen if n != first))
        hosts.append(tuple(layer))
    return Placement(n_layers, n_experts, tuple(hosts))


def repair_placement(placement: Placement, live: list[NodeCapacity], down: set[str], piece_bytes: int,
                     replicas: int) -> Placement:
    """The plan with every piece back to `replicas` live hosts where memory allows.

    A piece that lost hosts in `down` gains the least-loaded live nodes (by pieces per speed) that
    do not hold it and have room. Live hosts keep their order, so serving is not reshuffled; the
    new hosts follow them and the down hosts go last, so a node that comes back holds (and backs
    up) what it held before. A piece that finds no room keeps what it has: the coordinator's own
    copy is the last resort for it."""
    capacity = {n.node_id: n.memory_bytes // piece_bytes for n in live}
    speed = {n.node_id: max(n.speed, 1e-9) for n in live}
    order = [n.node_id for n in live]
    count = {n: 0 for n in order}
    for layer in placement.hosts:
        for hs in layer:
            for h in hs:
                if h in count:
                    count[h] += 1
    hosts = []
    for layer in placement.hosts:
        new_layer = []
        for hs in layer:
            alive = [h for h in hs if h not in down]
            for _ in range(replicas - len(alive)):
                candidates = [n for n in order if n not in hs and n not in alive and count[n] < capacity[n]]
                if not candidates:
                    break
                best = min(candidates, key=lambda n: (count[n] / speed[n], order.index(n)))
                alive.append(best)
                count[best] += 1
            new_layer.append(tuple(alive) + tuple(h for h in hs if h in down))
        hosts.append(tuple(new_layer))
    return Placement(placement.n_layers, placement.n_experts, tuple(hosts))


def restore_roles(placement: Placement, planned: Placement) -> Placement:
    """The hosts of every piece in the planned order again (so a node that came back is primary
    where it was planned to be), followed by any hosts a repair added. Routing skips hosts that are
    down, so this is right whoever is up; `repair_placement` put down hosts last, which left a
    healed node serving nothing."""
    hosts = tuple(tuple(tuple(ph) + tuple(h for h in hs if h not in ph) for hs, ph in zip(layer, planned_layer))
                  for layer, planned_layer in zip(placement.hosts, planned.hosts))
    return Placement(placement.n_layers, placement.n_experts, hosts)
