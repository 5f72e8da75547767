"""`moemesh node serve`: the gRPC expert node.

Hosts the experts a coordinator assigns to it: pieces come from its disk cache, its own copy of
the checkpoint (`--model`), or are pushed by the coordinator; then it computes one message per
layer per request on a bidirectional stream, returning its own timings in each reply. Every
request is validated against the model and the node's limits before anything is allocated; a
malformed one ends that stream with INVALID_ARGUMENT (too large: RESOURCE_EXHAUSTED) and the node
keeps serving everyone else. Also serves grpc.health.v1.

The server is asyncio (grpc.aio): an idle Compute stream holds no thread, so open streams can
never lock a new coordinator's handshake or a health check out (with a thread per stream, 16
idle streams did). Compute runs on the event loop thread itself (one native call at a time, the
kernels have the cores); slow work (hashing, disk, building layers) runs in a thread.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import native
from .checkpoint import Checkpoint, CheckpointError
from .identity import INSECURE_WARNING, Identity, TrustStore, server_credentials
from .paths import cache_root
from .experts import EXPERT_FORMATS, ExpertShape, experts_format, native_experts
from .heap import return_large_buffers_to_the_system, trim_heap
from .proto import moemesh_pb2 as pb
from .proto import moemesh_pb2_grpc as pb_grpc
from .protocol import (MAX_ACTIVATION, MAX_HIDDEN, MAX_REQUEST_TOKENS, MAX_STREAMS, MAX_STREAMS_PER_PEER,
                       PROTOCOL_VERSION, WireError, activation_dtype, decode_tensor, encode_tensor, layer_prefix,
                       server_options)
from .store import ChecksumError, HostedLayer, PieceCache, PieceWriter, build_layer, piece_sha256

WIRE = native.wire_codec()  # the q16 arithmetic of every request and reply

SERVICE_NAME = "moemesh.v1.ExpertNode"


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory() // 2


def us_since(t: float) -> int:
    return int((time.perf_counter() - t) * 1e6)


def persistent_node_id(cache_dir: Path, fingerprint: str) -> str:
    """This node's id, the same across restarts: kept in its cache folder, first derived from its
    certificate fingerprint and the folder (several nodes of one device share the certificate but
    not the folder), random when insecure. A saved cluster plan names nodes by this id."""
    path = Path(cache_dir) / "node_id"
    try:
        node_id = path.read_text().strip()
        if len(node_id) == 12 and all(c in "0123456789abcdef" for c in node_id):
            return node_id
    except OSError:
        pass
    seed = f"{fingerprint}|{Path(cache_dir).resolve()}" if fingerprint else uuid.uuid4().hex
    node_id = hashlib.sha256(seed.encode()).hexdigest()[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id + "\n")
    return node_id


class RequestTooLarge(WireError):
    """A well-formed request beyond what this node offers (memory, tokens): RESOURCE_EXHAUSTED."""


# What this node computes (format, activation): MXFP4 experts with gpt-oss's clamped SwiGLU or the
# plain one (Qwen3-MoE converted by `moemesh convert`), bf16 experts with the plain one (Qwen3-MoE).
SERVED = (("mxfp4", "swiglu_clamped"), ("mxfp4", "swiglu"), ("q4", "swiglu"), ("q8", "swiglu"), ("bf16", "swiglu"))


def spec_problem(spec: pb.ExpertSpec) -> str | None:
    """Why this node cannot host experts so described, or None: checked before anything is kept."""
    if (spec.format, spec.activation) not in SERVED or spec.format not in EXPERT_FORMATS:
        return (f"format {spec.format!r} with activation {spec.activation!r} is not served by this node (it serves "
                + ", ".join(f"{f} with {a}" for f, a in SERVED) + ")")
    if not (0 < spec.hidden <= MAX_HIDDEN and spec.hidden % 32 == 0 and 0 < spec.intermediate <= 8 * MAX_HIDDEN
            and spec.intermediate % 32 == 0):
        return (f"hidden size {spec.hidden} and intermediate size {spec.intermediate} must be multiples of 32, "
                f"at most {MAX_HIDDEN} and {8 * MAX_HIDDEN}")
    if not (spec.layers > 0 and 0 < spec.experts_per_token <= spec.experts):
        return f"{spec.layers} layers, {spec.experts_per_token} experts per token of {spec.experts}: not a model"
    if spec.activation == "swiglu_clamped" and not (math.isfinite(spec.swiglu_alpha) and
                                                    math.isfinite(spec.swiglu_limit) and spec.swiglu_limit > 0):
        return f"swiglu alpha {spec.swiglu_alpha} and limit {spec.swiglu_limit} must be finite, the limit positive"
    if spec.tensor_prefix.count("{layer}") != 1:
        return f"tensor prefix {spec.tensor_prefix!r} must hold '{{layer}}' once"
    return None


class ExpertNodeService(pb_grpc.ExpertNodeServicer):
    def __init__(self, name: str, cache_dir: Path, max_memory: int | None = None, model_dir: str | None = None,
                 node_id: str | None = None):
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.name = name
        self.cache = PieceCache(cache_dir)
        self.max_memory = max_memory
        self.own = Checkpoint(model_dir) if model_dir else None
        self.model_id = ""
        self.shape: ExpertShape | None = None
        self.tensor_prefix = ""  # where our own checkpoint holds a layer's experts (the assignment says)
        self.assigned: dict[tuple[int, int], pb.PieceRef] = {}
        self.local_source: dict[tuple[int, int], str] = {}  # pieces found in our own checkpoint
        self.layers: dict[int, HostedLayer] = {}
        self.fingerprint = ""  # of our certificate, advertised on mDNS (empty when insecure)
        self.calls = 0  # RPCs handled: proves that refused clients never reached a handler
        self.streams: dict[str, int] = {}  # open Compute streams per peer connection
        self.speed = (0, 0)  # (token_us, batch64_us): see calibrate()
        self.cache_lock = None  # the open lock file on cache_dir while serving (see lock_cache_dir)

    def close(self) -> None:
        """Let go of the cache folder (after the server stopped)."""
        if self.cache_lock is not None:
            self.cache_lock.close()
            self.cache_lock = None

    # -- handshake and state ---------------------------------------------------------------------
    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory else available_memory()

    async def Info(self, request, context):
        self.calls += 1
        hosted = [pb.LayerExperts(layer=i, experts=list(h.experts)) for i, h in sorted(self.layers.items())]
        return pb.NodeInfo(protocol_version=PROTOCOL_VERSION, node_id=self.node_id, name=self.name,
                           cores=native.get_threads(), isa=native.active_isa(), memory_total=total_memory(),
                           memory_budget=self.memory_budget(), model_id=self.model_id, hosted=hosted,
                           weight_bytes=self.weight_bytes(), calls=self.calls, max_tokens=MAX_REQUEST_TOKENS,
                           max_streams=MAX_STREAMS_PER_PEER, token_us=self.speed[0], batch64_us=self.speed[1])

    def weight_bytes(self) -> int:
        return sum(a.nbytes for h in self.layers.values() for a in h.weights.arrays())

    async def Assign(self, request, context):
        self.calls += 1
        spec = request.spec
        problem = spec_problem(spec)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec: {problem}")
        shape = ExpertShape(spec.experts, spec.hidden, spec.intermediate, spec.swiglu_limit, spec.swiglu_alpha,
                            top_k=spec.experts_per_token, format=spec.format, activation=spec.activation)
        piece_bytes = experts_format(shape).piece_nbytes(shape)
        for p in request.pieces:
            if p.layer >= spec.layers or p.expert >= shape.n_experts or p.nbytes != piece_bytes:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"piece (layer {p.layer}, expert {p.expert}, {p.nbytes} bytes) does not fit the spec")
        if len(request.pieces) * piece_bytes > self.memory_budget():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{len(request.pieces)} pieces need {len(request.pieces) * piece_bytes} bytes; "
                                f"this node offers {self.memory_budget()}")
        missing, local = await asyncio.to_thread(self._sources, request.pieces, shape, spec.tensor_prefix)
        if request.model_id != self.model_id:
            self.layers = {}  # another model: nothing loaded is of use
        # Same model (a placement repair): keep serving the loaded share until Load swaps.
        self.model_id, self.shape, self.tensor_prefix = request.model_id, shape, spec.tensor_prefix
        self.assigned = {(p.layer, p.expert): p for p in request.pieces}
        self.local_source = local
        return pb.AssignReply(missing=missing)

    def _sources(self, pieces, shape: ExpertShape, prefix: str):
        """Pieces neither cached nor in our own checkpoint, and those found in the checkpoint.
        (Cached pieces are verified when loaded, all at once.)"""
        missing, local = [], {}
        for p in pieces:
            if self.cache.has(p.sha256, p.nbytes):
                continue
            if self.own is not None and self._own_piece_sha(p, shape, prefix) == p.sha256:
                local[(p.layer, p.expert)] = p.sha256
                continue
            missing.append(p)
        return missing, local

    def _own_piece_sha(self, p, shape: ExpertShape, prefix: str) -> str | None:
        try:
            return piece_sha256(experts_format(shape).from_checkpoint(self.own, layer_prefix(prefix, p.layer), shape)
                                .piece(p.expert))
        except CheckpointError:
            return None

    async def PushWeights(self, request_iterator, context):
        self.calls += 1
        stored, rejected = [], []
        writer, key = None, None
        try:
            async for chunk in request_iterator:
                k = (chunk.layer, chunk.expert)
                if k != key:
                    if writer is not None:
                        self._commit(writer, key, stored, rejected)
                    ref = self.assigned.get(k)
                    if ref is None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"piece {k} was not assigned to this node")
                    writer, key = PieceWriter(self.cache, ref.sha256, ref.nbytes), k
                try:
                    writer.write(chunk.offset, chunk.data, chunk.crc32)
                except ChecksumError:
                    writer.abort()
                    rejected.append(self.assigned[k])
                    writer, key = None, ("skip",) + k
            if writer is not None:
                self._commit(writer, key, stored, rejected)
        finally:
            if writer is not None and not writer.file.closed:
                writer.abort()
        return pb.PushReply(stored=stored, rejected=rejected)

    def _commit(self, writer: PieceWriter, key, stored, rejected):
        try:
            writer.commit()
            stored.append(self.assigned[key])
        except ChecksumError:
            rejected.append(self.assigned[key])

    async def Load(self, request, context):
        self.calls += 1
        t0 = time.perf_counter()
        if request.model_id != self.model_id or self.shape is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Load before Assign (or for another model)")
        layers, missing = await asyncio.to_thread(self._build_layers, dict(self.assigned), self.shape)
        if missing:
            return pb.LoadReply(weight_bytes=self.weight_bytes(), load_us=us_since(t0), missing=missing)
        self.layers = layers
        self.speed = await asyncio.to_thread(self.calibrate)
        return pb.LoadReply(weight_bytes=self.weight_bytes(), load_us=us_since(t0))

    def calibrate(self, batch: int = 64) -> tuple[int, int]:
        """Time one token and `batch` tokens through the first hosted layer (random activations,
        experts dealt round-robin; best of two), in microseconds: what a coordinator expects of
        this node before it has seen a request of some size."""
        if not self.layers:
            return (0, 0)
        hosted = next(iter(self.layers.values()))
        k = self.shape.top_k or 1
        rng = np.random.default_rng(0)
        times = []
        for n in (1, batch):
            x = rng.standard_normal((n, self.shape.hidden)).astype(np.float32)
            ids = (np.arange(n * k, dtype=np.int32) % len(hosted.experts)).reshape(n, k)
            ids = np.where(np.arange(k) < len(hosted.experts), ids, -1).astype(np.int32)
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                native_experts(native, hosted.weights, self.shape, x, ids, "fast")
                best = min(best, time.perf_counter() - t)
            times.append(max(1, int(best * 1e6)))
        native.park_workers()
        return times[0], times[1]

    def _build_layers(self, assigned: dict, shape: ExpertShape):
        """The hosted layers, built from verified pieces; or, when any piece is corrupt or gone,
        none and every such piece (each corrupt one dropped from the cache): one round of pushes
        then heals them all."""
        by_layer: dict[int, list[int]] = {}
        for layer, expert in sorted(assigned):
            by_layer.setdefault(layer, []).append(expert)
        layers, missing = {}, []
        for layer, experts in by_layer.items():
            loaded = self.layers.get(layer)
            if loaded is not None and list(loaded.experts) == experts:
                layers[layer] = loaded  # unchanged by a repair: no second copy
                continue
            pieces = []
            for e in experts:
                try:
                    pieces.append(self._piece_bytes(assigned[(layer, e)], layer, e, shape))
                except (FileNotFoundError, ChecksumError):
                    missing.append(assigned[(layer, e)])
            if not missing:
                layers[layer] = build_layer(pieces, experts, shape)
        return layers, missing

    def _piece_bytes(self, ref, layer: int, expert: int, shape: ExpertShape) -> bytes:
        if (layer, expert) in self.local_source:
            arrays = experts_format(shape).from_checkpoint(self.own, layer_prefix(self.tensor_prefix, layer), shape).piece(expert)
            return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        return self.cache.read(ref.sha256)

    async def Release(self, request, context):
        self.calls += 1
        self.layers, self.assigned, self.local_source, self.model_id = {}, {}, {}, ""
        return pb.ReleaseReply()

    # -- compute ---------------------------------------------------------------------------------
    async def Compute(self, request_iterator, context):
        self.calls += 1
        peer = context.peer()
        if self.streams.get(peer, 0) >= MAX_STREAMS_PER_PEER or sum(self.streams.values()) >= MAX_STREAMS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many open compute streams (at most {MAX_STREAMS_PER_PEER} per connection, "
                                f"{MAX_STREAMS} in all)")
        self.streams[peer] = self.streams.get(peer, 0) + 1
        try:
            async for request in request_iterator:
                t_recv = time.perf_counter()
                try:
                    hosted, x, local_ids, wire_dtype = self._decode(request)
                except (RequestTooLarge, WireError, ValueError) as e:
                    seq, code = request.seq, (grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, RequestTooLarge)
                                              else grpc.StatusCode.INVALID_ARGUMENT)
                    request = None  # the refused message's buffers go back before the heap is trimmed (abort raises)
                    trim_heap()
                    await context.abort(code, f"request {seq}: {e}")
                t_start = time.perf_counter()
                out = native_experts(native, hosted.weights, self.shape, x, local_ids, request.precision)
                t_done = time.perf_counter()
                native.park_workers()  # the next request is a layer away: leave the cores to the device
                y = encode_tensor(out[local_ids >= 0], wire_dtype, WIRE)
                yield pb.ExpertReply(seq=request.seq, y=y, timing=pb.NodeTiming(
                    decode_us=int((t_start - t_recv) * 1e6), queue_us=0,
                    compute_us=int((t_done - t_start) * 1e6), encode_us=us_since(t_done)))
        finally:
            self.streams[peer] -= 1
            if not self.streams[peer]:
                del self.streams[peer]

    def request_bytes(self, n_tokens: int) -> int:
        """Memory one request of n_tokens allocates: its activations, the k outputs per token
        and the kernels' intermediate rows."""
        s = self.shape
        return n_tokens * 4 * (s.hidden + s.top_k * (s.hidden + 2 * s.inter))

    def _decode(self, request):
        """Validate a request against the model and this node's limits, then decode it. Shapes
        are checked from the message's header before any array exists."""
        hosted = self.layers.get(request.layer)
        if hosted is None:
            raise WireError(f"layer {request.layer} has no experts on this node")
        wire_dtype = activation_dtype(request.precision)
        x_shape, ids_shape = list(request.x.shape), list(request.expert_ids.shape)
        if len(x_shape) == 2 and len(ids_shape) == 2:
            n, k = x_shape[0], self.shape.top_k
            width_ok = ids_shape[1] == k if k else 0 < ids_shape[1] <= self.shape.n_experts
            if not width_ok:
                raise WireError(f"expert_ids: {ids_shape[1]} slots per token, the model routes each token to {k}")
            if n > MAX_REQUEST_TOKENS:
                raise RequestTooLarge(f"{n} tokens in one request; this node takes at most {MAX_REQUEST_TOKENS}")
            if self.max_memory:
                need, held = self.request_bytes(n), self.weight_bytes()
                if held + need > self.max_memory:
                    raise RequestTooLarge(f"{n} tokens need {need} bytes beyond the {held} of weights within "
                                          f"--max-memory {self.max_memory}")
        x = decode_tensor(request.x, "x", (wire_dtype,), 2, limit=MAX_ACTIVATION, codec=WIRE)
        ids = decode_tensor(request.expert_ids, "expert_ids", ("i32",), 2, codec=WIRE)
        if x.shape[1] != self.shape.hidden:
            raise WireError(f"x: hidden size {x.shape[1]}, the model has {self.shape.hidden}")
        if ids.shape[0] != x.shape[0]:
            raise WireError(f"expert_ids: {ids.shape[0]} rows for {x.shape[0]} tokens")
        return hosted, np.ascontiguousarray(x, np.float32), hosted.to_local(ids), wire_dtype


async def start(port: int = 0, name: str | None = None, cache_dir: str | None = None, max_memory: int | None = None,
                model_dir: str | None = None, host: str = "[::]", identity_dir: str | None = None,
                insecure: bool = False):
    """Start the server (mutual TLS with pinned peers unless insecure) on the running event loop;
    returns (server, service, port). Raises OSError when the port cannot be had."""
    import socket
    import sys

    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is not a TCP port (0-65535)")
    return_large_buffers_to_the_system()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    lock = lock_cache_dir(cache)
    service = ExpertNodeService(name or socket.gethostname(), cache, max_memory, model_dir)
    service.cache_lock = lock  # held for the node's life
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_ExpertNodeServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    taken = OSError(f"cannot listen on {host}:{port} (is another node or program using that port?)")
    if port and not port_is_free(host, port):
        raise taken
    try:
        if insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
            service.node_id = persistent_node_id(cache, "")
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            me = Identity.load_or_create(identity_dir, service.name)
            service.fingerprint = me.fingerprint
            service.node_id = persistent_node_id(cache, me.fingerprint)
            bound = server.add_secure_port(f"{host}:{port}", server_credentials(me, TrustStore(identity_dir)))
    except RuntimeError:  # grpc.aio raises where the sync server returned 0
        bound = 0
    if bound == 0:
        raise taken
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, service, bound


def lock_cache_dir(cache: Path):
    """Hold the cache folder for this node alone: its id lives there, so two running nodes sharing
    it would answer as one node (and a coordinator would use one of them). Returns the open lock
    file; raises OSError naming the folder when another running node holds it."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    f = open(cache / "node.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OSError(f"the cache folder {cache} is in use by another running node: give each node its own "
                      f"--cache-dir") from None
    return f


def port_is_free(host: str, port: int) -> bool:
    """Whether a bind without SO_REUSEPORT of host:port succeeds: checked before gRPC, which
    would log its own error line first."""
    import socket

    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as gRPC does: connections of a node just restarted in TIME_WAIT must not count as taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bare, port))
        except OSError:
            return False
    return True


def default_cache_dir() -> Path:
    return cache_root() / "node"
