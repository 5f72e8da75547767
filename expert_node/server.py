"""`moemesh node serve`: the gRPC expert node.

Hosts the experts a coordinator assigns to it: pieces come from its disk cache, its own copy of
the checkpoint (`--model`), or are pushed by the coordinator; then it computes one message per
layer per request on a bidirectional stream, returning its own timings in each reply. Every
request is validated before any native call; a malformed one ends that stream with
INVALID_ARGUMENT and the node keeps serving everyone else. Also serves grpc.health.v1.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import native
from .checkpoint import Checkpoint, CheckpointError
from .identity import INSECURE_WARNING, Identity, TrustStore, server_credentials
from .experts import ExpertShape, LayerExperts, native_experts
from .proto import moemesh_pb2 as pb
from .proto import moemesh_pb2_grpc as pb_grpc
from .protocol import GRPC_OPTIONS, MAX_ACTIVATION, PROTOCOL_VERSION, WireError, activation_dtype, decode_tensor, encode_tensor
from .store import ChecksumError, HostedLayer, PieceCache, PieceWriter, build_layer, piece_sha256

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


class ExpertNodeService(pb_grpc.ExpertNodeServicer):
    def __init__(self, name: str, cache_dir: Path, max_memory: int | None = None, model_dir: str | None = None,
                 node_id: str | None = None):
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.name = name
        self.cache = PieceCache(cache_dir)
        self.max_memory = max_memory
        self.own = Checkpoint(model_dir) if model_dir else None
        self._lock = threading.Lock()  # assignment state
        self._compute_lock = threading.Lock()  # one native call at a time; waiting on it is queue time
        self.model_id = ""
        self.shape: ExpertShape | None = None
        self.assigned: dict[tuple[int, int], pb.PieceRef] = {}
        self.local_source: dict[tuple[int, int], str] = {}  # pieces found in our own checkpoint
        self.layers: dict[int, HostedLayer] = {}
        self.fingerprint = ""  # of our certificate, advertised on mDNS (empty when insecure)
        self.calls = 0  # RPCs handled: proves that refused clients never reached a handler

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    # -- handshake and state ---------------------------------------------------------------------
    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory else available_memory()

    def Info(self, request, context):
        self._count()
        with self._lock:
            hosted = [pb.LayerExperts(layer=i, experts=list(h.experts)) for i, h in sorted(self.layers.items())]
            weight_bytes = self.weight_bytes()
        return pb.NodeInfo(protocol_version=PROTOCOL_VERSION, node_id=self.node_id, name=self.name,
                           cores=native.get_threads(), isa=native.active_isa(), memory_total=total_memory(),
                           memory_budget=self.memory_budget(), model_id=self.model_id, hosted=hosted,
                           weight_bytes=weight_bytes, calls=self.calls)

    def weight_bytes(self) -> int:
        return sum(a.nbytes for h in self.layers.values() for a in vars(h.weights).values())

    def Assign(self, request, context):
        self._count()
        try:
            config = json.loads(request.config_json)
            shape = ExpertShape.from_config(config)
        except (ValueError, KeyError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config_json: not a usable model config ({e})")
        piece_bytes = LayerExperts.piece_nbytes(shape)
        n_layers = int(config.get("num_hidden_layers", 0))
        for p in request.pieces:
            if p.layer >= n_layers or p.expert >= shape.n_experts or p.nbytes != piece_bytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"piece (layer {p.layer}, expert {p.expert}, {p.nbytes} bytes) does not fit the config")
        if len(request.pieces) * piece_bytes > self.memory_budget():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.pieces)} pieces need {len(request.pieces) * piece_bytes} bytes; "
                          f"this node offers {self.memory_budget()}")
        missing, local = [], {}
        for p in request.pieces:
            if self.cache.has(p.sha256, p.nbytes):
                continue
            if self.own is not None and self._own_piece_sha(p, shape) == p.sha256:
                local[(p.layer, p.expert)] = p.sha256
                continue
            missing.append(p)
        with self._lock:
            if request.model_id != self.model_id:
                self.layers = {}  # another model: nothing loaded is of use
            # Same model (a placement repair): keep serving the loaded share until Load swaps.
            self.model_id, self.shape = request.model_id, shape
            self.assigned = {(p.layer, p.expert): p for p in request.pieces}
            self.local_source = local
        return pb.AssignReply(missing=missing)

    def _own_piece_sha(self, p, shape: ExpertShape) -> str | None:
        try:
            return piece_sha256(LayerExperts.from_checkpoint(self.own, p.layer, shape).piece(p.expert))
        except CheckpointError:
            return None

    def PushWeights(self, request_iterator, context):
        self._count()
        stored, rejected = [], []
        writer, key = None, None
        try:
            for chunk in request_iterator:
                k = (chunk.layer, chunk.expert)
                if k != key:
                    if writer is not None:
                        self._commit(writer, key, stored, rejected)
                    ref = self.assigned.get(k)
                    if ref is None:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"piece {k} was not assigned to this node")
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

    def Load(self, request, context):
        self._count()
        t0 = time.perf_counter()
        with self._lock:
            if request.model_id != self.model_id or self.shape is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Load before Assign (or for another model)")
            by_layer: dict[int, list[int]] = {}
            for layer, expert in sorted(self.assigned):
                by_layer.setdefault(layer, []).append(expert)
            layers = {}
            try:
                for layer, experts in by_layer.items():
                    loaded = self.layers.get(layer)
                    if loaded is not None and list(loaded.experts) == experts:
                        layers[layer] = loaded  # unchanged by a repair: no second copy
                        continue
                    pieces = [self._piece_bytes(layer, e) for e in experts]
                    layers[layer] = build_layer(pieces, experts, self.shape)
            except (FileNotFoundError, ChecksumError) as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"weights incomplete: {e}")
            self.layers = layers
            return pb.LoadReply(weight_bytes=self.weight_bytes(), load_us=us_since(t0))

    def _piece_bytes(self, layer: int, expert: int) -> bytes:
        ref = self.assigned[(layer, expert)]
        if (layer, expert) in self.local_source:
            arrays = LayerExperts.from_checkpoint(self.own, layer, self.shape).piece(expert)
            return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        return self.cache.read(ref.sha256)

    def Release(self, request, context):
        self._count()
        with self._lock:
            self.layers, self.assigned, self.local_source, self.model_id = {}, {}, {}, ""
        return pb.ReleaseReply()

    # -- compute ---------------------------------------------------------------------------------
    def Compute(self, request_iterator, context):
        self._count()
        for request in request_iterator:
            t_recv = time.perf_counter()
            try:
                hosted, x, local_ids, wire_dtype = self._decode(request)
            except (WireError, ValueError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {request.seq}: {e}")
            t_dec = time.perf_counter()
            with self._compute_lock:
                t_start = time.perf_counter()
                out = native_experts(native, hosted.weights, self.shape, x, local_ids, request.precision)
                t_done = time.perf_counter()
            native.park_workers()  # the next request is a layer away: leave the cores to the device
            y = encode_tensor(out[local_ids >= 0], wire_dtype)
            yield pb.ExpertReply(seq=request.seq, y=y, timing=pb.NodeTiming(
                decode_us=int((t_dec - t_recv) * 1e6), queue_us=int((t_start - t_dec) * 1e6),
                compute_us=int((t_done - t_start) * 1e6), encode_us=us_since(t_done)))

    def _decode(self, request):
        hosted = self.layers.get(request.layer)
        if hosted is None:
            raise WireError(f"layer {request.layer} has no experts on this node")
        wire_dtype = activation_dtype(request.precision)
        x = decode_tensor(request.x, "x", (wire_dtype,), 2, limit=MAX_ACTIVATION)
        ids = decode_tensor(request.expert_ids, "expert_ids", ("i32",), 2)
        if x.shape[1] != self.shape.hidden:
            raise WireError(f"x: hidden size {x.shape[1]}, the model has {self.shape.hidden}")
        if ids.shape[0] != x.shape[0]:
            raise WireError(f"expert_ids: {ids.shape[0]} rows for {x.shape[0]} tokens")
        return hosted, np.ascontiguousarray(x, np.float32), hosted.to_local(ids), wire_dtype


def serve(port: int = 0, name: str | None = None, cache_dir: str | None = None, max_memory: int | None = None,
          model_dir: str | None = None, host: str = "[::]", node_id: str | None = None,
          identity_dir: str | None = None, insecure: bool = False):
    """Start the server (mutual TLS with pinned peers unless insecure); returns (server, service, port)."""
    import socket

    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "node"
    service = ExpertNodeService(name or socket.gethostname(), cache, max_memory, model_dir, node_id)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="moemesh-node"),
                         options=GRPC_OPTIONS, maximum_concurrent_rpcs=64)
    pb_grpc.add_ExpertNodeServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if insecure:
        import sys

        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        me = Identity.load_or_create(identity_dir, service.name)
        service.fingerprint = me.fingerprint
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(me, TrustStore(identity_dir)))
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, service, bound
