"""The coordinator's side of a cluster: connect to expert nodes, place and ship the experts, and
compute each layer's experts remotely behind the same ExpertBackend as the local kernels.

One request per node per layer carries every token that needs that node's experts; requests to
all nodes go out together on per-node bidirectional streams and the answers are combined in a
fixed order, so the result is bit-identical to a single-device run.

By job: node_client (one node: channel, handshake, compute stream, status), provisioning (piece
hashes, pushes, assign + load), remote (the remote expert backend: routing, deadlines, failover
within a layer, tracing), failover (marking a node down, repair, revival), connect (bringing a
cluster up), plan (the saved plan and its checks).
"""
from .connect import ClusterReport, connect
from .node_client import ClusterError, NodeClient, credentials, hosted_pieces, node_status
from .plan import default_plan_path, load_plan, plan_problems, save_plan
from .provisioning import piece_chunks, piece_hashes, push_pieces
from .remote import RemoteExpertBackend

__all__ = ["ClusterError", "ClusterReport", "NodeClient", "RemoteExpertBackend", "connect", "credentials",
           "default_plan_path", "hosted_pieces", "load_plan", "node_status", "piece_chunks", "piece_hashes",
           "plan_problems", "push_pieces", "save_plan"]
