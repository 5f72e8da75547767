"""The coordinator's side of a cluster: connect to expert nodes, place and ship the experts, and
compute each layer's experts remotely behind the same ExpertBackend as the local kernels.

One request per node per layer carries every token that needs that node's experts; requests to
all nodes go out together on per-node bidirectional streams and the answers are combined in a
fixed order, so the result is bit-identical to a single-device run.
"""
from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from expert_node.checkpoint import Checkpoint
from expert_node import native
from expert_node.experts import ExpertBackend, ExpertShape, LayerExperts, NativeExpertBackend
from expert_node.identity import CHANNEL_TLS_OPTIONS, INSECURE_WARNING, Identity, TrustStore, channel_credentials
from expert_node.paths import cache_root
from expert_node.proto import moemesh_pb2 as pb
from expert_node.proto import moemesh_pb2_grpc as pb_grpc
from expert_node.protocol import (PROTOCOL_VERSION, WEIGHT_CHUNK_BYTES, WireError, activation_dtype, client_options,
                                  decode_tensor, encode_tensor)
from expert_node.store import piece_sha256

from .generation import PREFILL_CHUNK, NonFiniteError
from .models import family_of
from .placement import NodeCapacity, Placement, plan_placement, repair_placement, restore_roles
from .tracing import NULL_TRACER

WIRE = native.wire_codec()  # the q16 arithmetic of every hop

PUSH_ATTEMPTS = 3  # a piece rejected for a bad checksum is sent again this many times
# Expert outputs beyond this are no honest node's (they feed a residual stream of magnitude
# ~1e2); NaN or Inf likewise. Such a reply counts as the node's fault.
MAX_ACTIVATION_REPLY = 1e9


class ClusterError(RuntimeError):
    """A node could not be used; the message names it and says why."""


def rpc_error(address: str, what: str, e: grpc.RpcError) -> ClusterError:
    return ClusterError(f"node {address}: {what} failed: {e.code().name}: {e.details()}")


class ComputeSession:
    """A Compute stream to one node: submit() sends a request and returns a Future for its reply."""

    def __init__(self, stub: pb_grpc.ExpertNodeStub, address: str):
        self.address = address
        self._requests: queue.Queue = queue.Queue()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._closed = None
        self._call = stub.Compute(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"moemesh-recv-{address}")
        self._reader.start()

    def submit(self, request: pb.ExpertRequest) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            self._pending[request.seq] = fut
        self._requests.put(request)
        return fut

    def _read(self) -> None:
        try:
            for reply in self._call:
                with self._lock:
                    fut = self._pending.pop(reply.seq, None)
                if fut is not None:
                    fut.arrived = time.perf_counter()  # for the profiler: the reply's arrival
                    fut.set_result(reply)
            error = ClusterError(f"node {self.address}: compute stream ended")
        except grpc.RpcError as e:
            error = rpc_error(self.address, "compute", e)
        with self._lock:
            self._closed = error
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(error)

    @property
    def ended(self) -> ClusterError | None:
        """Why the stream ended (the node died or restarted), or None while it is open."""
        with self._lock:
            return self._closed

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


def credentials(insecure: bool = False, identity_dir=None) -> grpc.ChannelCredentials | None:
    """Mutual-TLS credentials of this device (None: plaintext, for --insecure labs)."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None
    return channel_credentials(Identity.load_or_create(identity_dir), TrustStore(identity_dir))


class NodeClient:
    def __init__(self, address: str, creds: grpc.ChannelCredentials | None):
        self.address = address
        self.channel = (grpc.secure_channel(address, creds, options=client_options() + CHANNEL_TLS_OPTIONS) if creds
                        else grpc.insecure_channel(address, options=client_options()))
        self.stub = pb_grpc.ExpertNodeStub(self.channel)
        self.info: pb.NodeInfo | None = None
        self.session: ComputeSession | None = None
        self.rtt_s = 0.0  # of the last handshake

    def handshake(self, timeout: float = 5.0) -> pb.NodeInfo:
        try:
            t = time.perf_counter()
            info = self.stub.Info(pb.InfoRequest(protocol_version=PROTOCOL_VERSION), timeout=timeout)
            self.rtt_s = time.perf_counter() - t
        except grpc.RpcError as e:
            raise rpc_error(self.address, "handshake", e) from None
        if info.protocol_version != PROTOCOL_VERSION:
            raise ClusterError(f"node {self.address} speaks protocol version {info.protocol_version}; "
                               f"this coordinator speaks {PROTOCOL_VERSION}")
        self.info = info
        return info

    def call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            raise rpc_error(self.address, what, e) from None

    def close(self) -> None:
        if self.session:
            self.session.close()
        self.channel.close()


# -- weights ---------------------------------------------------------------------------------------

def piece_hashes(ckpt: Checkpoint, shape: ExpertShape, n_layers: int) -> dict[tuple[int, int], str]:
    """sha256 of every (layer, expert) piece, cached per checkpoint (files' sizes and mtimes)."""
    stamp = hashlib.sha256(str(ckpt.folder.resolve()).encode())
    for f in sorted(ckpt.folder.glob("*.safetensors")):
        st = f.stat()
        stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache_root() / "piece-hashes" / f"{stamp.hexdigest()[:32]}.json"
    if path.exists():
        return {tuple(map(int, k.split(","))): v for k, v in json.loads(path.read_text()).items()}
    family = family_of(ckpt)
    layers = family.load_layer_experts(ckpt, range(n_layers))
    keys = [(l, e) for l in range(n_layers) for e in range(shape.n_experts)]
    with ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL on large buffers
        hashes = dict(zip(keys, pool.map(lambda k: piece_sha256(layers[k[0]].piece(k[1])), keys)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({f"{l},{e}": h for (l, e), h in hashes.items()}))
    return hashes


def model_id(ckpt: Checkpoint, hashes: dict) -> str:
    h = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode())
    for k in sorted(hashes):
        h.update(hashes[k].encode())
    return h.hexdigest()[:24]


def piece_chunks(layers: dict[int, LayerExperts], refs: list[pb.PieceRef]):
    for ref in refs:
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in layers[ref.layer].piece(ref.expert))
        for off in range(0, len(raw), WEIGHT_CHUNK_BYTES):
            data = raw[off:off + WEIGHT_CHUNK_BYTES]
            yield pb.WeightChunk(layer=ref.layer, expert=ref.expert, offset=off, data=data, crc32=zlib.crc32(data))


def push_pieces(client: NodeClient, layers: dict[int, LayerExperts], missing: list[pb.PieceRef], bar=None) -> int:
    """Send missing pieces; re-send rejected ones. Returns bytes sent."""
    sent = 0
    for _ in range(PUSH_ATTEMPTS):
        if not missing:
            return sent

        def counted(chunks):
            nonlocal sent
            for c in chunks:
                sent += len(c.data)
                if bar is not None:
                    bar.update(len(c.data))
                yield c

        reply = client.call("weight push", client.stub.PushWeights, counted(piece_chunks(layers, missing)))
        missing = list(reply.rejected)
    raise ClusterError(f"node {client.address}: {len(missing)} pieces still fail their checksum after "
                       f"{PUSH_ATTEMPTS} attempts")


# -- the backend -------------------------------------------------------------------------------------

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
class Provisioner:
    """What a node needs to serve its share (used at connect, and again when a node comes back)."""
    model_id: str
    config_json: str
    piece_bytes: int
    hashes: dict
    layers: dict[int, LayerExperts]  # the coordinator's zero-copy views: the source of pushes
    progress: bool | None = None

    def provision(self, client: NodeClient, pieces: list[tuple[int, int]], new_session: bool = True,
                  progress: bool | None = None) -> int:
        """Assign, push what is missing, load (skipped when the node already holds exactly this
        share) and, unless the node is serving now (a repair), open a fresh compute stream. The
        node keeps serving its old share until the load swaps the new one in. Returns bytes pushed."""
        from tqdm import tqdm

        progress = self.progress if progress is None else progress
        pushed = 0
        if client.info.model_id != self.model_id or hosted_pieces(client.info) != set(pieces):
            refs = [pb.PieceRef(layer=l, expert=e, nbytes=self.piece_bytes, sha256=self.hashes[(l, e)])
                    for l, e in pieces]
            reply = client.call("assign", client.stub.Assign, pb.Assignment(
                model_id=self.model_id, config_json=self.config_json, pieces=refs), timeout=600)
            missing = list(reply.missing)
            for _ in range(PUSH_ATTEMPTS):
                with tqdm(total=len(missing) * self.piece_bytes, unit="B", unit_scale=True, leave=False,
                          desc=f"push {client.info.name}", disable=None if progress is None else not progress) as bar:
                    pushed += push_pieces(client, self.layers, missing, bar)
                loaded = client.call("load", client.stub.Load, pb.LoadRequest(model_id=self.model_id), timeout=600)
                # The node verifies every cached piece at load and names all that failed at once.
                missing = list(loaded.missing)
                if not missing:
                    break
            else:
                raise ClusterError(f"node {client.address}: {len(missing)} cached pieces still fail verification "
                                   f"after {PUSH_ATTEMPTS} pushes")
            client.handshake()  # its calibration, measured at this load
        if not new_session:
            return pushed
        if client.session:
            client.session.close()
        client.session = ComputeSession(client.stub, client.address)
        return pushed


@dataclass
class RemoteExpertBackend(ExpertBackend):
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
            self._trace_hop(node, layer, n_tokens, t0, t1, fut.arrived, t3, time.perf_counter(), reply.timing)

    def _compute_locally(self, layer, x, expert_ids, mask, out) -> None:
        if self.local is None:
            missing = sorted(set(expert_ids[mask].tolist()))
            raise ClusterError(f"layer {layer}: no live node hosts experts {missing}")
        rows = mask.any(axis=1)
        ids = np.where(mask, expert_ids, -1)[rows].astype(np.int32)
        with self.tracer.span("local experts", layer=layer):
            out[rows] += np.where(mask[rows][..., None], self.local.run(layer, x[rows], ids), 0.0)

    # -- liveness --------------------------------------------------------------------------------
    def mark_down(self, node: str, why: str) -> None:
        with self._lock:
            if not self._up[node] or self._closed.is_set():  # streams end on close: not a failure
                return
            self._up[node] = False
            self.events.append((time.monotonic(), node, f"down: {why}"))
        print(f"moemesh: {self.node_label(node)} is down ({why}); its experts go to replicas", file=sys.stderr)
        threading.Thread(target=self._revive, args=(node,), daemon=True, name=f"moemesh-revive-{node}").start()
        if self.provisioner is not None:
            threading.Thread(target=self._repair, daemon=True, name=f"moemesh-repair-{node}").start()

    def _repair(self) -> None:
        """Give the pieces of down nodes new live hosts (pushing the weights), then switch routing.
        Waits repair_grace_s first: a node that was only slow is back by then, and nothing is pushed."""
        if self._closed.wait(self.repair_grace_s):
            return
        with self._repair_lock:
            if self._closed.is_set():
                return
            with self._lock:
                down = {n for n, up in self._up.items() if not up}
                live = [n for n, up in self._up.items() if up]
                current = self.placement
            capacities = [node_capacity(n, self.clients[n].info) for n in live]
            repaired = repair_placement(current, capacities, down, self.provisioner.piece_bytes, self.replicas)
            gained = {n: set(repaired.pieces_of(n)) - set(current.pieces_of(n)) for n in live}
            gained = {n: g for n, g in gained.items() if g}
            if not gained:
                return
            try:
                for n in gained:
                    client = self.clients[n]
                    client.handshake(timeout=5.0)
                    self.provisioner.provision(client, repaired.pieces_of(n), new_session=False, progress=False)
            except ClusterError as e:
                print(f"moemesh: placement repair stopped ({e}); the coordinator covers the rest", file=sys.stderr)
                return
            with self._lock:
                self.placement = repaired
                for n, g in gained.items():
                    self.events.append((time.monotonic(), n, f"repaired: {len(g)} pieces"))
            moved = ", ".join(f"{len(g)} to {self.clients[n].info.name}" for n, g in gained.items())
            print(f"moemesh: placement repaired ({moved} pieces)", file=sys.stderr)

    def _watch(self) -> None:
        """A node that restarts or dies while no request is in flight ends its stream unnoticed;
        finding that here keeps a dead replica from being the one a failover turns to."""
        while not self._closed.wait(self.revive_interval_s):
            for node in self._node_ids:
                session = self.clients[node].session
                ended = session.ended if session is not None else None
                if ended is not None and self.is_up(node):
                    self.mark_down(node, str(ended))

    def _revive(self, node: str) -> None:
        """Poll a down node (handshake, health) until it answers, re-provision it, mark it up."""
        client = self.clients[node]
        while not self._closed.wait(self.revive_interval_s):
            try:
                client.handshake(timeout=1.0)
                if self.provisioner is None:
                    client.session.close()
                    client.session = ComputeSession(client.stub, client.address)
                else:
                    self.provisioner.provision(client, self.placement.pieces_of(node))
            except ClusterError:
                continue
            self.deadlines.announce(node, client.info, client.rtt_s)
            with self._lock:
                self._up[node] = True
                # Back to its planned roles: repairs moved it behind the live hosts of its pieces.
                self.placement = restore_roles(self.placement, self.planned)
                self.events.append((time.monotonic(), node, "up"))
            print(f"moemesh: {self.node_label(node)} is back", file=sys.stderr)
            return

    def _trace_hop(self, node, layer, tokens, t0, t1, t2, t3, t4, timing: pb.NodeTiming) -> None:
        """serialize [t0, t1], round trip [t1, t2] (wire = rtt - node time), deserialize [t3, t4];
        the node's own spans are centred in the round trip."""
        tr, label, us = self.tracer, self.node_label(node), self.tracer.us
        node_us = timing.decode_us + timing.queue_us + timing.compute_us + timing.encode_us
        rtt_us = (t2 - t1) * 1e6
        wire_us = max(rtt_us - node_us, 0.0)
        args = dict(layer=layer, node=label, tokens=tokens)
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


@dataclass(frozen=True)
class ClusterReport:
    """What `connect` did, for the topology table."""
    node_id: str
    address: str
    info: pb.NodeInfo
    pieces: int
    bytes_pushed: int
    rtt_ms: float = 0.0  # median of 5 handshakes, shown in the topology table


def node_capacity(node_id: str, info: pb.NodeInfo) -> NodeCapacity:
    """What the planner weighs a node by: the memory it offers and its cores as its speed."""
    return NodeCapacity(node_id, info.memory_budget, float(max(info.cores, 1)))


def hosted_pieces(info: pb.NodeInfo) -> set[tuple[int, int]]:
    return {(h.layer, e) for h in info.hosted for e in h.experts}


def measure_rtt(client: NodeClient, samples: int = 5) -> float:
    """Median handshake round trip in milliseconds."""
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        client.handshake()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def handshake_all(addresses: list[str], creds) -> tuple[dict[str, NodeClient], list[str]]:
    """Clients of every address that answers, keyed by the node id it reports over the
    authenticated connection (an mDNS advert's id is only a claim: an advert copying a node's id
    and fingerprint fails the TLS handshake here), and one line per address that did not."""
    clients: dict[str, NodeClient] = {}
    skipped = []
    for address in addresses:
        c = NodeClient(address, creds)
        try:
            info = c.handshake()
        except ClusterError as e:
            c.close()
            skipped.append(str(e))
            continue
        if info.node_id in clients:  # the same node behind two addresses (or adverts): keep one
            c.close()
            continue
        clients[info.node_id] = c
    return clients, skipped


def fit_plan(placement: Placement, clients: dict[str, NodeClient], renamed: dict[str, str], piece_bytes: int,
             replicas: int) -> Placement:
    """A saved plan made to run on the nodes that answered: nodes that answer at a planned address
    under another id (another node, with its own cache folder, now there) take over the old roles; the pieces of nodes
    that did not answer get live hosts with room (pushing only what they miss); what finds no room
    is left to the coordinator's own copy."""
    hosts = tuple(tuple(tuple(renamed.get(h, h) for h in hs) for hs in layer) for layer in placement.hosts)
    placement = Placement(placement.n_layers, placement.n_experts, hosts)
    down = set(placement.nodes()) - set(clients)
    if not down:
        return placement
    live = [node_capacity(n, c.info) for n, c in clients.items()]
    repaired = repair_placement(placement, live, down, piece_bytes, replicas)
    hosts = tuple(tuple(tuple(h for h in hs if h not in down) for hs in layer) for layer in repaired.hosts)
    return Placement(placement.n_layers, placement.n_experts, hosts)


def connect(ckpt: Checkpoint, precision: str, addresses: list[str], replicas: int = 1,
            placement: Placement | None = None, progress: bool | None = None, local_fallback: bool = True,
            creds: grpc.ChannelCredentials | None | str = "default", plan_nodes: dict[str, str] | None = None
            ) -> tuple[RemoteExpertBackend, list[ClusterReport]]:
    """Handshake with every node, plan (or fit a saved plan to the nodes that answered), ship the
    missing weights, load, and open the streams. A node that does not answer is skipped with a
    note when the others (or the coordinator's own copy) can serve its share.

    creds: mutual-TLS credentials ("default": this device's identity; None: plaintext).
    plan_nodes: the saved plan's node id -> address, to recognise a node that changed its id."""
    if creds == "default":
        creds = credentials()
    if not addresses:
        raise ClusterError("no expert nodes found (start `moemesh node serve` on a device, or pass --node host:port)")
    family = family_of(ckpt)
    shape = family.expert_shape(ckpt.config)
    n_layers = int(ckpt.config["num_hidden_layers"])
    clients, skipped = handshake_all(addresses, creds)
    if not clients:
        raise ClusterError("no expert node answered: " + "; ".join(skipped))
    for why in skipped:
        print(f"moemesh: skipping {why}", file=sys.stderr)
    for c in clients.values():
        if c.info.max_tokens < PREFILL_CHUNK:
            raise ClusterError(f"node {c.address} takes {c.info.max_tokens} tokens per request; this coordinator "
                               f"sends up to {PREFILL_CHUNK}")
    piece_bytes = LayerExperts.piece_nbytes(shape)
    if placement is None:
        capacities = [node_capacity(nid, c.info) for nid, c in clients.items()]
        if replicas > len(capacities) and local_fallback and skipped:
            print(f"moemesh: {len(capacities)} nodes answered: {len(capacities)} replicas instead of {replicas}",
                  file=sys.stderr)
            replicas = len(capacities)
        placement = plan_placement(n_layers, shape.n_experts, piece_bytes, capacities, replicas)
    else:
        replicas = max(replicas, placement.replicas())  # the plan's own
        by_address = {c.address: nid for nid, c in clients.items()}
        renamed = {old: by_address[a] for old, a in (plan_nodes or {}).items()
                   if a in by_address and old != by_address[a] and old not in clients}
        placement = fit_plan(placement, clients, renamed, piece_bytes, replicas)
        orphans = [(l, e) for l, layer in enumerate(placement.hosts) for e, hs in enumerate(layer) if not hs]
        if orphans and not local_fallback:
            raise ClusterError(f"{len(orphans)} experts have no live node with room for them (first: layer "
                               f"{orphans[0][0]}, expert {orphans[0][1]})")
        if orphans:
            print(f"moemesh: {len(orphans)} experts have no live node with room; the coordinator computes them",
                  file=sys.stderr)
    for nid, c in clients.items():
        if nid not in placement.nodes():
            c.close()
    hashes = piece_hashes(ckpt, shape, n_layers)
    layers = family.load_layer_experts(ckpt, range(n_layers))
    provisioner = Provisioner(model_id(ckpt, hashes), json.dumps(ckpt.config), piece_bytes, hashes, layers, progress)
    reports = []
    for node_id in placement.nodes():
        client = clients[node_id]
        pushed = provisioner.provision(client, placement.pieces_of(node_id))
        reports.append(ClusterReport(node_id, client.address, client.info, len(placement.pieces_of(node_id)), pushed,
                                     measure_rtt(client)))
    local = NativeExpertBackend(layers, shape, precision) if local_fallback else None
    backend = RemoteExpertBackend({nid: clients[nid] for nid in placement.nodes()}, placement, shape, precision,
                                  provisioner, local)
    return backend, reports


# -- the saved plan ----------------------------------------------------------------------------------

def default_plan_path() -> Path:
    return cache_root() / "cluster.json"


def save_plan(path: Path, model_folder: str, reports: list[ClusterReport], placement: Placement) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": str(Path(model_folder).resolve()),
                                "nodes": {r.node_id: r.address for r in reports},
                                "placement": placement.to_dict()}, indent=1))


def load_plan(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
        plan["placement"] = Placement.from_dict(plan["placement"])
        return plan
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"{path}: not a usable cluster plan ({e}); run `moemesh cluster up` again") from None


def plan_problems(plan: dict, rows: list[dict]) -> list[str]:
    """Why a saved plan cannot run as saved, given each planned node's `node_status` row (in the
    plan's order): a node down, answering under another id, or not holding its share."""
    problems = []
    for (node_id, address), row in zip(plan["nodes"].items(), rows):
        if not row["up"]:
            problems.append(f"node {node_id} at {address} does not answer ({row['error']})")
            continue
        if row["node_id"] != node_id:
            problems.append(f"{address} answers as node {row['node_id']}, the plan names {node_id} there")
            continue
        want = set(plan["placement"].pieces_of(node_id))
        held = {(int(l), e) for l, es in row["layers"].items() for e in es}
        if want - held:
            problems.append(f"node {node_id} at {address} holds {len(want & held)} of its {len(want)} experts")
    return problems


def node_status(address: str, creds: grpc.ChannelCredentials | None, timeout: float = 2.0) -> dict:
    """One row of `cluster status`: the node's own report, or why it did not answer."""
    client = NodeClient(address, creds)
    try:
        t = time.perf_counter()
        info = client.handshake(timeout)
        rtt = (time.perf_counter() - t) * 1e3
        return {"address": address, "up": True, "node_id": info.node_id, "name": info.name, "isa": info.isa,
                "cores": info.cores, "model_id": info.model_id, "weight_bytes": info.weight_bytes,
                "memory_budget": info.memory_budget, "rtt_ms": rtt,
                "layers": {str(h.layer): list(h.experts) for h in info.hosted}}
    except ClusterError as e:
        return {"address": address, "up": False, "error": str(e)}
    finally:
        client.close()

