"""One expert node seen from the coordinator: its channel (mutual TLS with a pinned peer), the
handshake, the Compute stream (ComputeSession: a request queue, a reader thread, a Future per
request), its round-trip time and a status probe.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future

import grpc
import numpy as np

from expert_node.identity import CHANNEL_TLS_OPTIONS, INSECURE_WARNING, Identity, TrustStore, channel_credentials
from expert_node.proto import moemesh_pb2 as pb
from expert_node.proto import moemesh_pb2_grpc as pb_grpc
from expert_node.protocol import PROTOCOL_VERSION, client_options

from ..placement import NodeCapacity

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


def measure_rtt(client: NodeClient, samples: int = 5) -> float:
    """Median handshake round trip in milliseconds."""
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        client.handshake()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


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


def node_capacity(node_id: str, info: pb.NodeInfo) -> NodeCapacity:
    """What the planner weighs a node by: the memory it offers and its cores as its speed."""
    return NodeCapacity(node_id, info.memory_budget, float(max(info.cores, 1)))


def hosted_pieces(info: pb.NodeInfo) -> set[tuple[int, int]]:
    return {(h.layer, e) for h in info.hosted for e in h.experts}
