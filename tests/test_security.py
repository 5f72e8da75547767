"""Pairing and mutual TLS: a code-authenticated first contact pins certificates; unpaired or
plaintext clients never reach a handler; unpaired nodes get no expert calls."""
import socket
import threading

import grpc
import pytest

from coordinator import cluster
from expert_node.checkpoint import Checkpoint
from expert_node.identity import CHANNEL_TLS_OPTIONS, Identity, TrustStore, channel_credentials
from expert_node.pairing import PairingError, pair_connect, pair_listen
from expert_node.proto import moemesh_pb2 as pb
from expert_node.proto import moemesh_pb2_grpc as pb_grpc
from support import wait_until

pytestmark = pytest.mark.timeout(120)


def pair(a_dir, b_dir, code_a, code_b, listen_s=120):
    a, b = Identity.load_or_create(a_dir, "a"), Identity.load_or_create(b_dir, "b")
    ta, tb = TrustStore(a_dir), TrustStore(b_dir)
    port, result = [], {}
    ready = threading.Event()

    def listen():
        try:
            result["b"] = pair_listen(b, tb, "127.0.0.1", 0, code_b, "b", "node", lambda p: (port.append(p), ready.set()),
                                      lambda code, why: result.setdefault("new_codes", []).append(code), listen_s)
        except PairingError as e:
            result["b"] = e

    t = threading.Thread(target=listen)
    t.start()
    ready.wait(10)
    try:
        result["a"] = pair_connect(a, ta, f"127.0.0.1:{port[0]}", code_a, "a", "coordinator")
    except PairingError as e:
        result["a"] = e
    t.join(listen_s + 10)
    return a, b, ta, tb, result


def test_matching_codes_pin_both_certificates(tmp_path):
    a, b, ta, tb, r = pair(tmp_path / "a", tmp_path / "b", "123456", "123456")
    assert r["a"]["fingerprint"] == b.fingerprint and r["b"]["fingerprint"] == a.fingerprint
    assert ta.trusts(b.fingerprint, a) and tb.trusts(a.fingerprint, b)


def test_wrong_code_pins_nothing_and_spends_the_code(tmp_path):
    a, b, ta, tb, r = pair(tmp_path / "a", tmp_path / "b", "123456", "654321", listen_s=3)
    assert isinstance(r["a"], PairingError) and isinstance(r["b"], PairingError)
    assert "codes do not match" in str(r["a"]) and "no device paired within 3 s" in str(r["b"])
    assert len(r["new_codes"]) == 1 and r["new_codes"][0] != "654321"
    assert ta.peers() == {} and tb.peers() == {}


def test_listener_outlives_strangers_and_wrong_guesses(tmp_path):
    """Whoever connects first, whatever it sends, must not end a pairing session: a port scan and
    garbage are dropped, a wrong guess burns the code (a new one is shown) and the listener goes on
    until the right device types the new code. The spent code no longer works."""
    a, b = Identity.load_or_create(tmp_path / "a", "a"), Identity.load_or_create(tmp_path / "b", "b")
    ta, tb = TrustStore(tmp_path / "a"), TrustStore(tmp_path / "b")
    port, codes, result = [], [], {}
    ready, fresh = threading.Event(), threading.Event()

    def new_code(code, why):
        codes.append(code)
        fresh.set()

    t = threading.Thread(target=lambda: result.setdefault("b", pair_listen(
        b, tb, "127.0.0.1", 0, "111111", "b", "node", lambda p: (port.append(p), ready.set()), new_code, 60)))
    t.start()
    assert ready.wait(10)
    address = f"127.0.0.1:{port[0]}"
    socket.create_connection(("127.0.0.1", port[0])).close()  # a port scan
    with socket.create_connection(("127.0.0.1", port[0])) as s:  # garbage
        s.sendall(b"\x00\x00\x00\x05hello")
        s.recv(65536)
    with pytest.raises(PairingError, match="codes do not match"):
        pair_connect(a, ta, address, "222222", "a", "coordinator")
    assert fresh.wait(10) and codes[0] != "111111"
    with pytest.raises(PairingError):
        pair_connect(a, ta, address, "111111", "a", "coordinator")  # the spent code
    assert wait_until(lambda: len(codes) == 2, 10)  # the listener notices after the client does
    peer = pair_connect(a, ta, address, codes[-1], "a", "coordinator")
    t.join(10)
    assert peer["fingerprint"] == b.fingerprint and result["b"]["fingerprint"] == a.fingerprint


def calls_seen_by_owner(node, identity_dir=None) -> int:
    """The node's handled-RPC count, asked with the node's own (self-trusted) identity."""
    return cluster.NodeClient(node.address, cluster.credentials(identity_dir=identity_dir)).handshake().calls


def test_unpaired_and_plaintext_clients_never_reach_a_handler(start_node, tmp_path):
    node = start_node("--no-mdns", "--host", "127.0.0.1")
    before = calls_seen_by_owner(node)
    stranger = tmp_path / "stranger"
    creds = channel_credentials(Identity.load_or_create(stranger), TrustStore(stranger))
    for channel in (grpc.secure_channel(node.address, creds, options=CHANNEL_TLS_OPTIONS),
                    grpc.insecure_channel(node.address)):
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ExpertNodeStub(channel).Info(pb.InfoRequest(protocol_version=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    assert calls_seen_by_owner(node) == before + 1  # only the owner's own second Info


def test_unpaired_node_gets_no_expert_calls(tiny_dir, start_node, tmp_path, capsys):
    """An unpaired node fails the handshake and is skipped: the run goes on with the paired one."""
    rogue_dir = tmp_path / "rogue-identity"
    good = start_node("--no-mdns", "--host", "127.0.0.1")
    rogue = start_node("--no-mdns", "--host", "127.0.0.1", "--identity-dir", str(rogue_dir))
    experts, reports = cluster.connect(Checkpoint(tiny_dir), "fast", [good.address, rogue.address], progress=False)
    assert f"skipping node {rogue.address}: handshake failed: UNAVAILABLE" in capsys.readouterr().err
    assert [r.address for r in reports] == [good.address]
    experts.close()
    assert calls_seen_by_owner(rogue, rogue_dir) == 1  # its owner's Info: nobody else got through


def test_paired_devices_talk_over_mutual_tls(start_node, tmp_path):
    coordinator_dir, node_dir = tmp_path / "coordinator", tmp_path / "node"
    pair(coordinator_dir, node_dir, "777777", "777777")
    node = start_node("--no-mdns", "--host", "127.0.0.1", "--identity-dir", str(node_dir))
    info = cluster.NodeClient(node.address, cluster.credentials(identity_dir=coordinator_dir)).handshake()
    assert info.node_id == node.node_id
