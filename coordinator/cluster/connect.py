"""Bringing a cluster up: handshake every address, measure each node, place the experts (or fit a
saved plan), provision every node and return the remote backend with a report per node.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import grpc

from expert_node.checkpoint import Checkpoint
from expert_node.experts import NativeExpertBackend, experts_format
from expert_node.proto import moemesh_pb2 as pb

from ..generation import PREFILL_CHUNK
from ..models import expert_spec, family_of, layer_experts
from ..placement import Placement, plan_placement, repair_placement
from .node_client import ClusterError, NodeClient, credentials, measure_rtt, node_capacity
from .provisioning import Provisioner, model_id, piece_hashes
from .remote import RemoteExpertBackend

@dataclass(frozen=True)
class ClusterReport:
    """What `connect` did, for the topology table."""
    node_id: str
    address: str
    info: pb.NodeInfo
    pieces: int
    bytes_pushed: int
    rtt_ms: float = 0.0  # median of 5 handshakes, shown in the topology table


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
    shape = family_of(ckpt).expert_shape(ckpt.config)
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
    piece_bytes = experts_format(shape).piece_nbytes(shape)
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
    layers = layer_experts(ckpt, range(n_layers))
    provisioner = Provisioner(model_id(ckpt, hashes), expert_spec(ckpt), piece_bytes, hashes, layers,
                              progress)
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
