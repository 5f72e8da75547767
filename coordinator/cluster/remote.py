"""The remote expert backend: each layer's experts computed on the nodes behind the same
ExpertBackend as the local kernels, one request per node per layer for every token that needs
it, answers combined in a fixed order (bit-identical to a single device); deadlines from observed
latency, failover to replicas (or this device) within the layer; the background repair of the
placement and revival of a node that answers again are failover.py's.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from expert_node import native
from expert_node.experts import ExpertBackend, ExpertShape
from expert_node.proto import moemesh_pb2 as pb
from expert_node.protocol import WireError, activation_dtype, decode_tensor, encode_tensor

from ..generation import NonFiniteError
from ..placement import Placement
from ..tracing import NULL_TRACER
from .failover import Failover
from .node_client import ClusterError, NodeClient
from .provisioning import Provisioner

WIRE = native.wire_codec()  # the q16 arithmetic of every hop


# Expert outputs beyond this are no honest node's (they feed a residual stream of magnitude
# ~1e2); NaN or Inf likewise. Such a reply counts as the node's fault.
MAX_ACTIVATION_REPLY = 1e9


class Deadlines:
    """How long to wait for a node before re-sending its work elsewhere: twice the time expected
    for a request of that size plus four deviations (TCP's RTO rule), with a floor so scheduling
    noise does not trigger needless hedges.

    The expectation is a model of round-trip time against token count, per node: the EWMA of what
    was observed in the request's size bucket (powers of two); for a size not seen yet, a line
    through the nearest observed buckets, or through the node's own calibration (NodeInfo token_us
    and batch64_us, measured at its Load) shifted by the link's round trip. A frozen node then
    fails over within ~2x a first-of-its-size request's expected time, not after a fixed 5 s."""

    FLOOR_S = 0.05
    # A node that sat idle may need to wake up first (CPU clocks, a descheduled VM, pages swapped
    # out): its first request after IDLE_S gets at least AFTER_IDLE_S, or a chat left idle would
    # lose a node to its own wake-up (seen in CI: a 60 ms first reply after 4 s idle).
    IDLE_S, AFTER_IDLE_S = 1.0, 0.5
    UNKNOWN_S = 5.0  # a node that announced no speed, before any observation
    ALPHA = 0.125

    def __init__(self):
        self._stats: dict[tuple[str, int], tuple[float, float, float]] = {}  # (node, bucket) -> n, mean, dev
        self._prior: dict[str, tuple[float, float, float]] = {}  # node -> (rtt_s, token_s, batch64_s)
        self._last: dict[str, float] = {}  # node -> when its last reply arrived (monotonic)
        self._lock = threading.Lock()

    @staticmethod
    def bucket(n_tokens: int) -> int:
        return int(n_tokens).bit_length()

    def announce(self, node: str, info: pb.NodeInfo, rtt_s: float) -> None:
        """The node's calibration and the link's handshake round trip: the model before any request."""
        if info.token_us and info.batch64_us:
            with self._lock:
                self._prior[node] = (rtt_s, info.token_us * 1e-6, info.batch64_us * 1e-6)

    def expected(self, node: str, n_tokens: int) -> tuple[float, float] | None:
        """(mean, deviation) of the round trip of an n-token request, or None when nothing is known."""
        with self._lock:
            st = self._stats.get((node, self.bucket(n_tokens)))
            if st is not None:
                return st[1], st[2]
            seen = sorted(v for (nd, _), v in self._stats.items() if nd == node)
            prior = self._prior.get(node)
        points = [(n, mean) for n, mean, _ in seen]
        if prior is not None:
            rtt, one, batch = prior
            points_prior = [(1.0, rtt + one), (64.0, rtt + batch)]
            points = points or points_prior
            if len(points) == 1:  # one size seen: the node's own slope from it
                points.append((points[0][0] + 63.0, points[0][1] + batch - one))
        if not points:
            return None
        below = [p for p in points if p[0] <= n_tokens]
        above = [p for p in points if p[0] > n_tokens]
        if below and above:
            (n0, t0), (n1, t1) = below[-1], above[0]
        elif len(below) >= 2:
            (n0, t0), (n1, t1) = below[-2], below[-1]
        elif len(above) >= 2:
            (n0, t0), (n1, t1) = above[0], above[1]
        else:
            n0, t0 = points[0]
            return t0 * max(1.0, n_tokens / n0), t0 / 2  # one point, no slope: proportional, pessimistic
        slope = max(0.0, (t1 - t0) / (n1 - n0)) if n1 != n0 else 0.0
        mean = max(t0 + slope * (n_tokens - n0), min(t0, t1))
        return mean, mean / 4

    def deadline(self, node: str, n_tokens: int) -> float:
        e = self.expected(node, n_tokens)
        if e is None:
            return self.UNKNOWN_S
        with self._lock:
            idle = time.monotonic() - self._last.get(node, 0.0) > self.IDLE_S
        return max(self.AFTER_IDLE_S if idle else self.FLOOR_S, 2 * e[0] + 4 * e[1])

    def observe(self, node: str, n_tokens: int, rtt_s: float) -> None:
        key = (node, self.bucket(n_tokens))
        with self._lock:
            self._last[node] = time.monotonic()
            n, mean, dev = self._stats.get(key, (n_tokens, rtt_s, rtt_s / 2))
            n += self.ALPHA * (n_tokens - n)
            dev += self.ALPHA * (abs(rtt_s - mean) - dev)
            mean += self.ALPHA * (rtt_s - mean)
            self._stats[key] = (n, mean, dev)


@dataclass
class RemoteExpertBackend(Failover, ExpertBackend):
    """Experts on nodes, with failover: every request has a deadline from observed latency; a node
    that fails or misses it is marked down and its work re-sent to the next replica (or computed
    here from the coordinator's own checkpoint as a last resort) within the same layer, so the
    token stream goes on, identical. In the background, the placement is repaired (the down node's
    pieces pushed to live nodes with room, back to the replica count) and a down node is brought
    back when it answers."""

    clients: dict[str, NodeClient]  # node id -> client
    placement: Placement
    shape: ExpertShape
    precision: str
    provisioner: Provisioner | None = None
    local: ExpertBackend | None = None  # last resort: the coordinator computes an expert itself
    tracer: object = NULL_TRACER
    revive_interval_s: float = 0.5
    repair_grace_s: float = 1.0
    _seq: int = 0

    def __post_init__(self):
        self._node_ids = sorted(self.clients)
        self._index = {n: i for i, n in enumerate(self._node_ids)}
        self._up = {n: True for n in self._node_ids}
        self._lock = threading.Lock()
        self._repair_lock = threading.Lock()  # one repair at a time, each from the latest state
        self.replicas = max(1, self.placement.replicas())
        self.planned = self.placement  # who serves what while every node is up
        self._closed = threading.Event()
        self.deadlines = Deadlines()
        for node, client in self.clients.items():
            self.deadlines.announce(node, client.info, client.rtt_s)
        self.events: list[tuple[float, str, str]] = []  # (time, node, "down: why" / "up" / "repaired: ...")
        threading.Thread(target=self._watch, daemon=True, name="moemesh-watch").start()

    def node_label(self, node: str) -> str:
        c = self.clients[node]
        return f"node {c.info.name} {c.address}"

    def is_up(self, node: str) -> bool:
        with self._lock:
            return self._up[node]

    # -- routing ---------------------------------------------------------------------------------
    def _owners(self, layer: int, excluded: set[str]) -> np.ndarray:
        """Per expert, the index of the first live host not excluded in this call; -1: none."""
        owners = np.full(self.placement.n_experts, -1, np.int32)
        with self._lock:
            for e, hosts in enumerate(self.placement.hosts[layer]):
                for h in hosts:
                    if self._up.get(h) and h not in excluded:
                        owners[e] = self._index[h]
                        break
        return owners

    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        if not np.isfinite(native.max_abs(np.ascontiguousarray(x, np.float32))):
            # Our own numbers, not a node's fault: no node refusing them may be marked down.
            raise NonFiniteError(f"layer {layer}: the activations reaching the experts contain NaN or Inf")
        out = np.zeros(expert_ids.shape + (x.shape[1],), np.float32)
        todo = np.ones(expert_ids.shape, bool)
        excluded: set[str] = set()
        while todo.any():
            owner = self._owners(layer, excluded)[expert_ids]
            orphan = todo & (owner < 0)
            if orphan.any():
                self._compute_locally(layer, x, expert_ids, orphan, out)
                todo &= ~orphan
            sent = [self._send(node, layer, x, expert_ids, todo & (owner == i))
                    for i, node in enumerate(self._node_ids) if (todo & (owner == i)).any()]
            native.park_workers()  # spinning kernel threads would take the cores of nodes on this machine
            for node, mask, n_tokens, t0, t1, fut in sent:
                try:
                    reply = fut.result(timeout=max(0.0, t1 + self.deadlines.deadline(node, n_tokens) - time.perf_counter()))
                except (FutureTimeout, ClusterError) as e:
                    why = "no reply within its deadline" if isinstance(e, FutureTimeout) else str(e)
                    self.mark_down(node, why)
                    excluded.add(node)
                    continue
                try:
                    self._receive(node, layer, mask, n_tokens, t0, t1, fut, reply, out)
                except ClusterError as e:  # a malformed reply is that node's fault: fail over
                    self.mark_down(node, str(e))
                    excluded.add(node)
                    continue
                todo &= ~mask
        return out

    def _send(self, node, layer, x, expert_ids, mask):
        rows = mask.any(axis=1)
        self._seq += 1
        t0 = time.perf_counter()
        ids = np.where(mask, expert_ids, -1)[rows].astype(np.int32)
        request = pb.ExpertRequest(seq=self._seq, layer=layer, x=encode_tensor(x[rows], activation_dtype(self.precision), WIRE),
                                   expert_ids=encode_tensor(ids, "i32", WIRE), precision=self.precision)
        t1 = time.perf_counter()
        try:
            fut = self.clients[node].session.submit(request)
        except ClusterError as e:
            fut = Future()
            fut.set_exception(e)
        return node, mask, int(rows.sum()), t0, t1, fut

    def _receive(self, node, layer, mask, n_tokens, t0, t1, fut, reply, out) -> None:
        t3 = time.perf_counter()
        try:
            y = decode_tensor(reply.y, "y", (activation_dtype(self.precision),), 2, limit=MAX_ACTIVATION_REPLY, codec=WIRE)
        except WireError as e:
            raise ClusterError(f"node {self.clients[node].address}: malformed reply ({e})") from None
        if y.shape != (int(mask.sum()), out.shape[-1]):
            raise ClusterError(f"node {self.clients[node].address}: malformed reply (shape {list(y.shape)} for "
                               f"{int(mask.sum())} expert outputs)")
        out[mask] = y
        self.deadlines.observe(node, n_tokens, fut.arrived - t1)
        if self.tracer.enabled:
            self._trace_hop(node, layer, n_tokens, y.shape[0], t0, t1, fut.arrived, t3, time.perf_counter(), reply.timing)

    def _compute_locally(self, layer, x, expert_ids, mask, out) -> None:
        if self.local is None:
            missing = sorted(set(expert_ids[mask].tolist()))
            raise ClusterError(f"layer {layer}: no live node hosts experts {missing}")
        rows = mask.any(axis=1)
        ids = np.where(mask, expert_ids, -1)[rows].astype(np.int32)
        with self.tracer.span("local experts", layer=layer):
            out[rows] += np.where(mask[rows][..., None], self.local.run(layer, x[rows], ids), 0.0)

    # -- liveness --------------------------------------------------------------------------------
    def _trace_hop(self, node, layer, tokens, outputs, t0, t1, t2, t3, t4, timing: pb.NodeTiming) -> None:
        """serialize [t0, t1], round trip [t1, t2] (wire = rtt - node time), deserialize [t3, t4];
        the node's own spans are centred in the round trip. outputs: the expert rows it answered."""
        tr, label, us = self.tracer, self.node_label(node), self.tracer.us
        node_us = timing.decode_us + timing.queue_us + timing.compute_us + timing.encode_us
        rtt_us = (t2 - t1) * 1e6
        wire_us = max(rtt_us - node_us, 0.0)
        args = dict(layer=layer, node=label, tokens=tokens, outputs=outputs)
        track = f"rpc {label}"
        tr.add("serialize", "coordinator", track, us(t0), (t1 - t0) * 1e6, **args)
        tr.add("round trip", "coordinator", track, us(t1), rtt_us, wire_us=wire_us, node_us=node_us, **args)
        tr.add("deserialize", "coordinator", track, us(t3), (t4 - t3) * 1e6, **args)
        start = us(t1) + wire_us / 2
        for name, dur in (("node decode", timing.decode_us), ("node queue", timing.queue_us),
                          ("node compute", timing.compute_us), ("node encode", timing.encode_us)):
            tr.add(name, label, "expert node", start, float(dur), **args)
            start += dur

    def close(self) -> None:
        self._closed.set()
        for c in self.clients.values():
            c.close()
