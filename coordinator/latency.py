"""A latency model of one decode round, to say what a cluster would do on real separate devices.

This project's test machine runs the coordinator, every node and the link emulators on the same
two cores, so a measured cluster is slower than the devices it stands for. The model adds up what
a round costs from terms measured one at a time (bench/rounds.py measures them and checks the
model against the emulated lab):

    round = coordinator + per layer, the slowest node's
            (link round trip + the chunk's bytes at the link's rate + our per-hop overhead
             + the node's compute for the union of experts the chunk's tokens chose there)

A chunk of T tokens (the current one and its drafts) costs one round; it yields T tokens when
every draft holds and one when none does. Experts are chosen uniformly at random by the synthetic
checkpoints' routers, so the union of T tokens' top-k of E experts has E (1 - (1 - k/E)^T)
experts in expectation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    rtt_s: float = 0.0
    rate_bytes_s: float = 0.0  # 0 = unlimited


@dataclass(frozen=True)
class Compute:
    """Expert compute on one device: per round, a fixed part, one part per expert of the union
    (its weights streamed once whatever the tokens) and one per (token, expert) pair."""
    fixed_s: float = 0.0
    per_expert_s: float = 0.0
    per_pair_s: float = 0.0

    def seconds(self, union: float, pairs: float) -> float:
        return self.fixed_s + union * self.per_expert_s + pairs * self.per_pair_s


@dataclass(frozen=True)
class Node:
    link: Link
    compute: Compute
    overhead_s: float  # our software per hop: round trip on loopback minus the node's compute
    share: float  # the fraction of every layer's experts it hosts


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int
    top_k: int
    hidden: int
    wire_bytes_per_value: float = 2.125  # q16: int16 codes and a float32 scale per 32 values


def expected_union(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts among tokens' top-k choices, each a uniform k-subset of `experts`."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def hop_bytes(shape: Shape, tokens: int, pairs: float) -> float:
    """A request (the tokens' activations and expert ids) and its reply (one row per pair)."""
    return (tokens * shape.hidden + pairs * shape.hidden) * shape.wire_bytes_per_value + tokens * shape.top_k * 4


def layer_seconds(shape: Shape, node: Node, tokens: int) -> float:
    union = expected_union(shape.experts, shape.top_k, tokens) * node.share
    pairs = tokens * shape.top_k * node.share
    transfer = hop_bytes(shape, tokens, pairs) / node.link.rate_bytes_s if node.link.rate_bytes_s else 0.0
    return node.link.rtt_s + transfer + node.overhead_s + node.compute.seconds(union, pairs)


def cluster_round_seconds(shape: Shape, coordinator_s: float, nodes: list[Node], tokens: int) -> float:
    """One round of a chunk of `tokens` with the experts on `nodes`; coordinator_s is everything
    the coordinator does in that round besides waiting for experts."""
    return coordinator_s + shape.layers * max(layer_seconds(shape, n, tokens) for n in nodes if n.share > 0)


def single_round_seconds(shape: Shape, coordinator_s: float, compute: Compute, tokens: int) -> float:
    union = expected_union(shape.experts, shape.top_k, tokens)
    return coordinator_s + shape.layers * compute.seconds(union, tokens * shape.top_k)


def decode_tps(round_s: float, tokens_per_round: float) -> float:
    return tokens_per_round / round_s
