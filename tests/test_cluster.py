"""Expert nodes as real processes over real gRPC (and real mDNS inside a network namespace):
a cluster run must equal a single-device run token for token, and every fault must be a clear
error on the side that sees it while the node keeps serving."""
import json
import subprocess
import zlib
from concurrent import futures

import grpc
import numpy as np
import pytest

from support import GREEDY, MOEMESH, TESTS, alone, prompts, require_tools, run_batched
from coordinator import Engine, cluster
from coordinator import models
from coordinator.sampling import SamplingParams
from expert_node.checkpoint import Checkpoint
from expert_node.proto import moemesh_pb2 as pb
from expert_node.proto import moemesh_pb2_grpc as pb_grpc
from expert_node.protocol import PROTOCOL_VERSION, encode_tensor

pytestmark = pytest.mark.timeout(180)
PROMPT = list(range(1000, 1040))


def cluster_engine(folder, precision, addresses):
    experts, reports = cluster.connect(Checkpoint(folder), precision, addresses, progress=False)
    return Engine.load(folder, precision=precision, experts=experts), reports


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_two_nodes_equal_single_device(tiny_dir, start_node, precision):
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(2)]
    remote, reports = cluster_engine(tiny_dir, precision, [n.address for n in nodes])
    local = Engine.load(tiny_dir, precision=precision)
    assert sorted(r.pieces for r in reports) == [16, 16] and all(r.bytes_pushed > 0 for r in reports)
    np.testing.assert_allclose(remote.logits(PROMPT), local.logits(PROMPT), atol=1e-6, rtol=0)
    params = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    assert list(remote.generate(PROMPT, **params)) == list(local.generate(PROMPT, **params))
    # a second coordinator re-uses the nodes' caches: nothing is pushed again
    _, again = cluster_engine(tiny_dir, precision, [n.address for n in nodes])
    assert all(r.bytes_pushed == 0 for r in again)
    remote.model.experts.close()


def test_batched_sequences_on_nodes_equal_their_lone_runs(tiny_dir, start_node):
    """Three sequences decoding together over two nodes (a round per layer carries all their
    tokens) each get the tokens they get alone on a single device, greedy and sampled."""
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(2)]
    remote, _ = cluster_engine(tiny_dir, "fast", [n.address for n in nodes])
    local = Engine.load(tiny_dir, precision="fast")
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=5)
    jobs = [(p, 8, GREEDY if i != 1 else sampled, None) for i, p in enumerate(prompts(3))]
    outs = run_batched(remote, jobs)
    for (prompt, n, params, _), c in zip(jobs, outs):
        assert c.error is None
        assert c.tokens == alone(local, prompt, n, params)
    remote.model.experts.close()


def run_cli(*args, netns=None):
    cmd = MOEMESH + list(map(str, args))
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    return proc


def dig_ptr(netns):
    """Ask the mDNS port with dig, an mDNS client that is not ours (RFC 6762 §5.5 unicast query:
    dig rejects the unicast answers to a multicast query because they come from another address)."""
    require_tools("dig", install="apt-get install bind9-dnsutils")
    out = subprocess.run(["ip", "netns", "exec", netns, "dig", "+short", "+time=2", "+tries=2", "-p", "5353",
                          "@127.0.0.1", "_moemesh._tcp.local", "PTR"], capture_output=True, text=True, timeout=30)
    return [line for line in out.stdout.split() if line.endswith("._moemesh._tcp.local.")]


def test_mdns_discovery_across_processes_in_a_namespace(tiny_dir, start_node, netns):
    nodes = [start_node("--interface", "127.0.0.1", "--host", "127.0.0.1", "--name", f"n{i}", netns=netns)
             for i in range(3)]
    names = dig_ptr(netns)
    assert names and all(n.startswith(("n0-", "n1-", "n2-")) for n in names), names
    watch = subprocess.Popen(["ip", "netns", "exec", netns, *MOEMESH, "discover", "--watch", "--json", "--timeout", "12",
                              "--interface", "127.0.0.1"], stdout=subprocess.PIPE, text=True, cwd=TESTS)
    gen = ["generate", "-m", tiny_dir, "--tokens", ",".join(map(str, PROMPT)), "-n", 8, "--temp", 0, "--json"]
    out = run_cli(*gen, "--cluster", "--expect", 3, "--timeout", 10, "--interface", "127.0.0.1", netns=netns)
    assert out.stderr.count("experts,") == 3
    assert json.loads(out.stdout) == json.loads(run_cli(*gen).stdout)
    nodes[0].stop()  # graceful shutdown withdraws the advertisement (goodbye packets)
    events = [json.loads(line) for line in watch.communicate(timeout=30)[0].splitlines()]
    assert {e["node_id"] for e in events if e["event"] == "added"} == {n.node_id for n in nodes}
    assert [e["node_id"] for e in events if e["event"] == "removed"] == [nodes[0].node_id]


def test_unreachable_node_is_a_clear_error(tiny_dir):
    with pytest.raises(cluster.ClusterError, match=r"node 127.0.0.1:9: handshake failed: UNAVAILABLE"):
        cluster.connect(Checkpoint(tiny_dir), "exact", ["127.0.0.1:9"], progress=False)


def test_wrong_protocol_version_is_refused(tiny_dir):
    class OldNode(pb_grpc.ExpertNodeServicer):
        def Info(self, request, context):
            return pb.NodeInfo(protocol_version=99, node_id="old")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ExpertNodeServicer_to_server(OldNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(cluster.ClusterError, match=f"speaks protocol version 99; this coordinator speaks {PROTOCOL_VERSION}"):
            cluster.connect(Checkpoint(tiny_dir), "exact", [f"127.0.0.1:{port}"], progress=False, creds=None)
    finally:
        server.stop(0)


def compute_once(stub, request):
    return list(stub.Compute(iter([request]), timeout=30))


def test_bad_requests_get_invalid_argument_and_the_node_keeps_serving(tiny_dir, start_node):
    node = start_node("--no-mdns", "--host", "127.0.0.1")
    engine, _ = cluster_engine(tiny_dir, "exact", [node.address])
    stub = cluster.NodeClient(node.address, cluster.credentials()).stub
    x = np.ones((2, 64), np.float32)
    good = dict(seq=1, layer=0, x=encode_tensor(x, "f32"),
                expert_ids=encode_tensor(np.array([[0, 1, -1, -1], [2, -1, -1, -1]], np.int32), "i32"), precision="exact")
    bad = [
        (dict(x=encode_tensor(np.ones((2, 63), np.float32), "f32")), "hidden size 63"),
        (dict(expert_ids=encode_tensor(np.array([[0, 1, -1, -1], [2, 8, -1, -1]], np.int32), "i32")), "out of range"),
        (dict(expert_ids=encode_tensor(np.array([[0, 1], [2, -1]], np.int32), "i32")), "routes each token to 4"),
        (dict(layer=17), "layer 17 has no experts"),
        (dict(precision="fast"), "dtype 'f32' not accepted"),
        (dict(x=pb.Tensor(dtype="f32", shape=[2, 64], data=b"\0" * 7)), "7 bytes do not hold"),
        (dict(x=encode_tensor(np.full((2, 64), np.nan, np.float32), "f32")), "NaN or Inf"),
    ]
    for change, match in bad:
        with pytest.raises(grpc.RpcError) as err:
            compute_once(stub, pb.ExpertRequest(**{**good, **change}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()
    (reply,) = compute_once(stub, pb.ExpertRequest(**good))
    assert list(reply.y.shape) == [3, 64] and reply.timing.compute_us > 0
    np.testing.assert_allclose(engine.logits(PROMPT[:5]), Engine.load(tiny_dir).logits(PROMPT[:5]), atol=1e-6)


def test_corrupt_weight_chunk_is_rejected_then_refetched(tiny_dir, start_node):
    node = start_node("--no-mdns", "--host", "127.0.0.1")
    client = cluster.NodeClient(node.address, cluster.credentials())
    client.handshake()
    ckpt = Checkpoint(tiny_dir)
    shape = Engine.load(tiny_dir).model.experts.shape
    hashes = cluster.piece_hashes(ckpt, shape, 4)
    from expert_node.experts import LayerExperts

    size = LayerExperts.piece_nbytes(shape)
    ref = pb.PieceRef(layer=0, expert=3, nbytes=size, sha256=hashes[(0, 3)])
    missing = client.stub.Assign(pb.Assignment(model_id="m", spec=models.expert_spec(ckpt), pieces=[ref])).missing
    assert len(missing) == 1
    layers = models.layer_experts(ckpt, [0])
    chunks = list(cluster.piece_chunks(layers, [ref]))
    chunks[0] = pb.WeightChunk(layer=0, expert=3, offset=0, data=chunks[0].data, crc32=zlib.crc32(b"x"))
    reply = client.stub.PushWeights(iter(chunks))
    assert len(reply.rejected) == 1 and not reply.stored
    assert cluster.push_pieces(client, layers, list(reply.rejected)) == size  # sent again, accepted
    client.stub.Load(pb.LoadRequest(model_id="m"))
    assert client.handshake().weight_bytes == size


def test_a_node_with_its_own_copy_is_sent_no_weights(tiny_dir, start_node):
    """`node serve -m DIR` reads its pieces where the assignment's spec says a layer's experts
    sit (the node knows no model family), so nothing is pushed, and it computes the same."""
    node = start_node("--no-mdns", "--host", "127.0.0.1", "-m", str(tiny_dir))
    experts, reports = cluster.connect(Checkpoint(tiny_dir), "fast", [node.address], progress=False)
    assert [r.bytes_pushed for r in reports] == [0] and reports[0].pieces > 0
    np.testing.assert_array_equal(Engine.load(tiny_dir, "fast", experts=experts).logits(PROMPT[:5]),
                                  Engine.load(tiny_dir, "fast").logits(PROMPT[:5]))
    experts.close()
