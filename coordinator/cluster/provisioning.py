"""Shipping the experts: the content hash of every piece (cached per checkpoint), the model id
they make, pushing the pieces a node lacks in chunks, and the Provisioner that assigns a node
its share, pushes, loads and verifies it.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from expert_node.checkpoint import Checkpoint
from expert_node.experts import ExpertPieces, ExpertShape
from expert_node.paths import cache_root
from expert_node.proto import moemesh_pb2 as pb
from expert_node.protocol import WEIGHT_CHUNK_BYTES
from expert_node.store import piece_sha256

from ..models import layer_experts
from .node_client import ClusterError, ComputeSession, NodeClient, hosted_pieces

PUSH_ATTEMPTS = 3  # a piece rejected for a bad checksum is sent again this many times


def piece_hashes(ckpt: Checkpoint, shape: ExpertShape, n_layers: int) -> dict[tuple[int, int], str]:
    """sha256 of every (layer, expert) piece, cached per checkpoint (files' sizes and mtimes)."""
    stamp = hashlib.sha256(str(ckpt.folder.resolve()).encode())
    for f in sorted(ckpt.folder.glob("*.safetensors")):
        st = f.stat()
        stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache_root() / "piece-hashes" / f"{stamp.hexdigest()[:32]}.json"
    if path.exists():
        return {tuple(map(int, k.split(","))): v for k, v in json.loads(path.read_text()).items()}
    layers = layer_experts(ckpt, range(n_layers))
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


def piece_chunks(layers: dict[int, ExpertPieces], refs: list[pb.PieceRef]):
    for ref in refs:
        raw = b"".join(np.ascontiguousarray(a).tobytes() for a in layers[ref.layer].piece(ref.expert))
        for off in range(0, len(raw), WEIGHT_CHUNK_BYTES):
            data = raw[off:off + WEIGHT_CHUNK_BYTES]
            yield pb.WeightChunk(layer=ref.layer, expert=ref.expert, offset=off, data=data, crc32=zlib.crc32(data))


def push_pieces(client: NodeClient, layers: dict[int, ExpertPieces], missing: list[pb.PieceRef], bar=None) -> int:
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


@dataclass
class Provisioner:
    """What a node needs to serve its share (used at connect, and again when a node comes back)."""
    model_id: str
    spec: pb.ExpertSpec  # what the nodes host (models.expert_spec)
    piece_bytes: int
    hashes: dict
    layers: dict[int, ExpertPieces]  # the coordinator's zero-copy views: the source of pushes
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
                model_id=self.model_id, spec=self.spec, pieces=refs), timeout=600)
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
