"""Fault scenarios, many times over (issue 8); run by hand, not a test:

    python bench/faults.py [--kill-runs 50] [--freeze-runs 10] [-m DIR]

- kill: three nodes with 2 replicas; each run kills one node (-9) at a random token, restarts it;
  the tokens must equal a single-device run. Reports the longest stall between two tokens.
- freeze: SIGSTOP a node mid-generation; detection time against the deadline; SIGCONT; time
  until it is used again.
- repair: three nodes, no replicas; kill one; time until its pieces are pushed to the live nodes
  and routed there, and whether the cluster then runs identical without the coordinator's copy.
- rogue: a node with an unpaired identity beside a paired one; the coordinator tries to use both;
  runs served by the paired one alone (the rogue is skipped, never aborts the run) and calls that
  reached the rogue's handlers (must be 0).
- loss: one node behind the link emulator's `bad-wifi` preset; output identical; throughput as a
  ratio of the same cluster without the link.
The defects of issue 17, each with its figure:
- crafted: a [1, 2^22] id tensor, an oversize message and a token count beyond the node's limit;
  the node's RSS growth (must stay under 50 MB) and whether each was refused.
- idle: the keepalive policy shortened to 100 ms; the cluster idles 5 s (50 pings); nodes marked
  down and RPCs beyond the probe (both must be 0).
- heal: a node frozen then thawed (3 nodes, 2 replicas); seconds until it is primary for its
  planned share again, and requests it receives right after.
- unseen: a node frozen before the first 300-token request; the stall it causes (was 5.06 s).
- streams: 20 connections x 6 idle Compute streams; how many refused, and a newcomer's handshake
  latency (it timed out with 16).
- startdown: one of three addresses dead at start, 2 replicas; whether the run is identical.
- cache: every one of a node's cached pieces corrupted; connect attempts to heal them (was 32).
- malformed: a node whose replies are one row short; output identical, failovers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster import start_node  # noqa: E402  (bench/cluster.py)
from support import stream_with_fault  # noqa: E402  (tests/support.py)
from coordinator.tracing import Tracer  # noqa: E402

import grpc  # noqa: E402

from coordinator import Engine, cluster  # noqa: E402
from coordinator.demo import demo_model_dir  # noqa: E402
from coordinator.sampling import SamplingParams  # noqa: E402
from expert_node.checkpoint import Checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 16


def wait_until(pred, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def node_id_of(experts, address):
    return next(n for n, c in experts.clients.items() if c.address == address)


def kill_scenario(folder, runs, work) -> dict:
    nodes = [start_node(i, "--cache-dir", str(work / f"k{i}"), "--port", "0") for i in range(3)]
    ports = [a.rsplit(":", 1)[1] for _, a in nodes]
    experts, _ = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes], replicas=2, progress=False,
                                 local_fallback=False)
    remote, local = Engine.load(folder, "fast", experts=experts), Engine.load(folder, "fast")
    rng = np.random.default_rng(0)
    identical, stall = 0, 0.0
    try:
        for run in range(runs):
            prompt, params = rng.integers(0, 150_000, 6).tolist(), SamplingParams(temperature=0.8, seed=run)
            expected = [s.token for s in local.stream(prompt, TOKENS, params)]
            victim, kill_at = run % 3, int(rng.integers(1, TOKENS - 2))
            proc = nodes[victim][0]
            got, run_stall = stream_with_fault(remote, prompt, TOKENS, params, kill_at,
                                               lambda: (proc.kill(), proc.wait()))
            stall = max(stall, run_stall)
            identical += got == expected
            nid = node_id_of(experts, nodes[victim][1])
            nodes[victim] = start_node(victim, "--cache-dir", str(work / f"k{victim}"), "--port", ports[victim])
            wait_until(lambda: experts.is_up(nid), 15)
    finally:
        experts.close()
        for p, _ in nodes:
            p.kill()
    return {"runs": runs, "identical": identical, "longest_stall_ms": stall * 1e3}


def freeze_scenario(folder, runs, work) -> dict:
    nodes = [start_node(i, "--cache-dir", str(work / f"f{i}")) for i in range(2)]
    experts, _ = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes], replicas=2, progress=False,
                                 local_fallback=False)
    remote, local = Engine.load(folder, "fast", experts=experts), Engine.load(folder, "fast")
    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0)
    expected = [s.token for s in local.stream(prompt, TOKENS, params)]
    detections, ratios, back, identical = [], [], [], 0
    try:
        for run in range(runs):
            proc, address = nodes[run % 2]
            nid = node_id_of(experts, address)
            list(remote.stream(prompt, 4, params))  # fresh latency observations
            deadline = experts.deadlines.deadline(nid, 1)
            n_events = len(experts.events)
            proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            identical += [s.token for s in remote.stream(prompt, TOKENS, params)] == expected
            down = [t for t, n, what in experts.events[n_events:] if n == nid and what.startswith("down")]
            proc.send_signal(signal.SIGCONT)
            if down:
                detections.append((down[0] - t0) * 1e3)
                ratios.append((down[0] - t0) / deadline)
            back.append(wait_until(lambda: experts.is_up(nid), 10))
    finally:
        experts.close()
        for p, _ in nodes:
            p.kill()
    return {"runs": runs, "identical": identical, "detected": len(detections),
            "detection_ms_max": max(detections, default=float("nan")),
            "detection_over_deadline_max": max(ratios, default=float("nan")),
            "back_in_use_s_max": max((b for b in back if b is not None), default=float("nan"))}


def repair_scenario(folder, work) -> dict:
    nodes = [start_node(i, "--cache-dir", str(work / f"r{i}")) for i in range(3)]
    experts, _ = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes], progress=False)
    remote, local = Engine.load(folder, "fast", experts=experts), Engine.load(folder, "fast")
    prompt, params = [31, 32, 33], SamplingParams(temperature=0)
    expected = [s.token for s in local.stream(prompt, TOKENS, params)]
    try:
        list(remote.stream(prompt, 4, params))
        victim = node_id_of(experts, nodes[1][1])
        orphans = len(experts.placement.pieces_of(victim))
        nodes[1][0].kill()
        t0 = time.monotonic()
        identical = [s.token for s in remote.stream(prompt, TOKENS, params)] == expected
        wait_until(lambda: any(w.startswith("repaired") for _, _, w in experts.events), 60)
        repaired_at = [t for t, _, w in experts.events if w.startswith("repaired")]
        experts.local = None  # from here a piece left without a live host would raise
        identical_after = [s.token for s in remote.stream(prompt, TOKENS, params)] == expected
    finally:
        experts.close()
        for p, _ in nodes:
            p.kill()
    return {"pieces_moved": orphans, "identical_during": identical,
            "repaired_s": repaired_at[0] - t0 if repaired_at else float("nan"),
            "identical_after_without_local": identical_after}


def rogue_scenario(folder, work) -> dict:
    rogue_identity = work / "rogue-identity"
    good = start_node(0, "--cache-dir", str(work / "g"))
    rogue = start_node(1, "--cache-dir", str(work / "r"), "--identity-dir", str(rogue_identity))
    attempts, served = 0, 0
    try:
        for _ in range(10):
            attempts += 1
            try:
                experts, _ = cluster.connect(Checkpoint(folder), "fast", [good[1], rogue[1]], progress=False)
                served += list(experts.clients) == [node_id_of(experts, good[1])]
                experts.close()
            except cluster.ClusterError:
                pass
        calls = cluster.NodeClient(rogue[1], cluster.credentials(identity_dir=rogue_identity)).handshake().calls - 1
    finally:
        for p, _ in (good, rogue):
            p.kill()
    return {"attempts": attempts, "runs_served_by_the_paired_node": served, "calls_reaching_rogue": int(calls)}


def loss_scenario(folder, work) -> dict:
    from subprocess import PIPE, Popen

    nodes = [start_node(i, "--cache-dir", str(work / f"l{i}")) for i in range(2)]
    link = Popen([sys.executable, str(ROOT / "deploy" / "lab" / "linkem.py"), "--listen", "127.0.0.1:0", "--connect",
                  nodes[1][1], "--preset", "bad-wifi", "--seed", "1"], stdout=PIPE, text=True)
    proxied = link.stdout.readline().split()[3]
    prompt, params = [11, 12, 13], SamplingParams(temperature=0)
    local = Engine.load(folder, "fast")
    expected = [s.token for s in local.stream(prompt, TOKENS, params)]
    out = {}
    try:
        for name, addresses in (("clean", [nodes[0][1], nodes[1][1]]), ("bad-wifi", [nodes[0][1], proxied])):
            experts, _ = cluster.connect(Checkpoint(folder), "fast", addresses, progress=False)
            gen = Engine.load(folder, "fast", experts=experts).stream(prompt, TOKENS, params)
            out[name] = ([s.token for s in gen] == expected, gen.stats.decode_tps)
            experts.close()
    finally:
        link.terminate()
        for p, _ in nodes:
            p.kill()
    return {"identical": out["clean"][0] and out["bad-wifi"][0], "clean_tps": out["clean"][1],
            "bad_wifi_tps": out["bad-wifi"][1], "throughput_ratio": out["bad-wifi"][1] / out["clean"][1]}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def greedy(engine, prompt=(5, 6, 7, 8), n=TOKENS):
    return [s.token for s in engine.stream(list(prompt), n, SamplingParams(temperature=0))]


def crafted_scenario(folder, work) -> dict:
    from expert_node.identity import CHANNEL_TLS_OPTIONS
    from expert_node.proto import moemesh_pb2 as pb
    from expert_node.proto import moemesh_pb2_grpc as pb_grpc
    from expert_node.protocol import MAX_REQUEST_TOKENS, encode_tensor

    proc, address = start_node(0, "--cache-dir", str(work / "c"))
    experts, _ = cluster.connect(Checkpoint(folder), "exact", [address], progress=False)
    hidden, k = experts.shape.hidden, experts.shape.top_k
    channel = grpc.secure_channel(address, cluster.credentials(),
                                  options=[("grpc.max_send_message_length", 1 << 30)] + CHANNEL_TLS_OPTIONS)
    stub = pb_grpc.ExpertNodeStub(channel)
    before, refused = rss_mb(proc.pid), []
    x1 = encode_tensor(np.ones((1, hidden), np.float32), "f32")
    n = MAX_REQUEST_TOKENS + 1
    for x, ids in ((x1, np.full((1, 1 << 22), -1, np.int32)), (x1, np.full((1, 1 << 24), -1, np.int32)),
                   (encode_tensor(np.ones((n, hidden), np.float32), "f32"), np.full((n, k), -1, np.int32))):
        try:
            list(stub.Compute(iter([pb.ExpertRequest(seq=1, layer=0, precision="exact", x=x,
                                                     expert_ids=encode_tensor(ids, "i32"))]), timeout=60))
            refused.append("answered")
        except grpc.RpcError as e:
            refused.append(e.code().name)
    growth = rss_mb(proc.pid) - before
    ok = greedy(Engine.load(folder, "exact", experts=experts)) == greedy(Engine.load(folder, "exact"))
    channel.close()
    experts.close()
    proc.kill()
    return {"rss_growth_mb": growth, "outcomes": refused, "still_serving_identical": ok}


def idle_scenario(folder, work) -> dict:
    os.environ["MOEMESH_KEEPALIVE_MS"] = "100"  # nodes started below inherit it
    try:
        nodes = [start_node(i, "--cache-dir", str(work / f"i{i}")) for i in range(2)]
        experts, _ = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes], progress=False)
        remote = Engine.load(folder, "fast", experts=experts)
        first = greedy(remote)
        calls = [c.handshake().calls for c in experts.clients.values()]
        time.sleep(5)
        same = greedy(remote) == first
        extra = sum(c.handshake().calls - before - 1 for c, before in zip(experts.clients.values(), calls))
        downs = sum(what.startswith("down") for _, _, what in experts.events)
        experts.close()
    finally:
        del os.environ["MOEMESH_KEEPALIVE_MS"]
        for p, _ in nodes:
            p.kill()
    return {"idle_s": 5, "marked_down": downs, "extra_rpcs": extra, "identical": same}


def replicated(folder, work, tag: str, n: int):
    """n nodes holding every expert twice, no fallback to the coordinator: (nodes, backend, engine)."""
    nodes = [start_node(i, "--cache-dir", str(work / f"{tag}{i}")) for i in range(n)]
    experts, _ = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes], replicas=2, progress=False,
                                 local_fallback=False)
    return nodes, experts, Engine.load(folder, "fast", experts=experts)


def heal_scenario(folder, work) -> dict:
    nodes, experts, remote = replicated(folder, work, "h", 3)
    greedy(remote)
    victim = node_id_of(experts, nodes[0][1])
    primary = lambda p: sum(hs[0] == victim for layer in p.hosts for hs in layer)  # noqa: E731
    planned = primary(experts.planned)
    nodes[0][0].send_signal(signal.SIGSTOP)
    greedy(remote)
    wait_until(lambda: any(w.startswith("repaired") for _, _, w in experts.events), 10)
    nodes[0][0].send_signal(signal.SIGCONT)
    back = wait_until(lambda: experts.is_up(victim) and primary(experts.placement) == planned, 10)
    tracer = Tracer()
    remote.set_tracer(tracer)
    greedy(remote)
    used = sum(s.name == "round trip" and nodes[0][1] in s.args["node"] for s in tracer.spans)
    experts.close()
    for p, _ in nodes:
        p.kill()
    return {"roles_back_s": back if back is not None else float("nan"), "planned_primaries": planned,
            "requests_after_heal": used}


def unseen_scenario(folder, work) -> dict:
    nodes, experts, remote = replicated(folder, work, "u", 2)
    greedy(remote)
    long_prompt = list(range(100, 400))
    expected = greedy(Engine.load(folder, "fast"), long_prompt, 2)
    nodes[0][0].send_signal(signal.SIGSTOP)
    t = time.monotonic()
    same = greedy(remote, long_prompt, 2) == expected
    stall = time.monotonic() - t
    nodes[0][0].send_signal(signal.SIGCONT)
    experts.close()
    for p, _ in nodes:
        p.kill()
    return {"prompt_tokens": 300, "stall_s": stall, "identical": same}


def streams_scenario(folder, work) -> dict:
    proc, address = start_node(0, "--cache-dir", str(work / "s"))
    creds = cluster.credentials()
    hogs = [cluster.NodeClient(address, creds) for _ in range(20)]
    calls = [h.stub.Compute(iter(threading.Event().wait, True)) for h in hogs for _ in range(6)]
    time.sleep(1)
    refused = sum(c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in calls)
    t = time.perf_counter()
    cluster.NodeClient(address, creds).handshake(timeout=5)
    info_ms = (time.perf_counter() - t) * 1e3
    experts, _ = cluster.connect(Checkpoint(folder), "fast", [address], progress=False)
    same = greedy(Engine.load(folder, "fast", experts=experts)) == greedy(Engine.load(folder, "fast"))
    experts.close()
    for c in calls:
        c.cancel()
    for h in hogs:
        h.close()
    proc.kill()
    return {"idle_streams": len(calls), "refused": refused, "newcomer_handshake_ms": info_ms, "identical": same}


def startdown_scenario(folder, work) -> dict:
    nodes = [start_node(i, "--cache-dir", str(work / f"d{i}")) for i in range(2)]
    experts, reports = cluster.connect(Checkpoint(folder), "fast", [nodes[0][1], "127.0.0.1:9", nodes[1][1]],
                                       replicas=2, progress=False, local_fallback=False)
    same = greedy(Engine.load(folder, "fast", experts=experts)) == greedy(Engine.load(folder, "fast"))
    experts.close()
    for p, _ in nodes:
        p.kill()
    return {"addresses": 3, "nodes_used": len(reports), "identical": same}


def cache_scenario(folder, work) -> dict:
    cache = work / "cc"
    proc, address = start_node(0, "--cache-dir", str(cache))
    cluster.connect(Checkpoint(folder), "fast", [address], progress=False)[0].close()
    pieces = sorted((cache / "pieces").glob("*.bin"))
    for p in pieces:
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        p.write_bytes(bytes(raw))
    proc.kill()
    proc.wait()
    proc, address = start_node(0, "--cache-dir", str(cache))
    attempts = 0
    while attempts < len(pieces) + 1:
        attempts += 1
        try:
            experts, _ = cluster.connect(Checkpoint(folder), "fast", [address], progress=False)
            break
        except cluster.ClusterError:
            continue
    same = greedy(Engine.load(folder, "fast", experts=experts)) == greedy(Engine.load(folder, "fast"))
    experts.close()
    proc.kill()
    return {"corrupt_pieces": len(pieces), "attempts_to_heal": attempts, "identical": same}


def malformed_scenario(folder, work) -> dict:
    from expert_node import server as node_server

    real = node_server.encode_tensor
    node_server.encode_tensor = lambda a, dtype: real(a[:-1], dtype)  # one row short, in this process only
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, liar, port = asyncio.run_coroutine_threadsafe(
        node_server.start(0, "liar", str(work / "liar"), host="127.0.0.1"), loop).result(60)
    proc, address = start_node(0, "--cache-dir", str(work / "m"))
    try:
        experts, _ = cluster.connect(Checkpoint(folder), "fast", [f"127.0.0.1:{port}", address], replicas=2,
                                     progress=False, local_fallback=False)
        same = greedy(Engine.load(folder, "fast", experts=experts)) == greedy(Engine.load(folder, "fast"))
        failovers = sum("malformed reply" in what for _, _, what in experts.events)
        experts.close()
    finally:
        node_server.encode_tensor = real
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        liar.close()
        loop.call_soon_threadsafe(loop.stop)
        proc.kill()
    return {"identical": same, "failovers": failovers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--kill-runs", type=int, default=50)
    ap.add_argument("--freeze-runs", type=int, default=10)
    args = ap.parse_args()
    folder = Path(args.model) if args.model else demo_model_dir()
    work = Path(tempfile.mkdtemp(prefix="moemesh-faults-"))
    result = {"kill": kill_scenario(folder, args.kill_runs, work),
              "freeze": freeze_scenario(folder, args.freeze_runs, work),
              "repair": repair_scenario(folder, work),
              "rogue": rogue_scenario(folder, work),
              "loss": loss_scenario(folder, work),
              "crafted": crafted_scenario(folder, work),
              "idle": idle_scenario(folder, work),
              "heal": heal_scenario(folder, work),
              "unseen": unseen_scenario(folder, work),
              "streams": streams_scenario(folder, work),
              "startdown": startdown_scenario(folder, work),
              "cache": cache_scenario(folder, work),
              "malformed": malformed_scenario(folder, work)}
    for name, r in result.items():
        print(f"{name:<7} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
