"""Fault scenarios, many times over (issue 8); run by hand, not a test:

    python bench/faults.py [--kill-runs 50] [--freeze-runs 10] [-m DIR]

- kill: three nodes with 2 replicas; each run kills one node (-9) at a random token, restarts it;
  the tokens must equal a single-device run. Reports the longest stall between two tokens.
- freeze: SIGSTOP a node mid-generation; detection time against the deadline; SIGCONT; time
  until it is used again.
- repair: three nodes, no replicas; kill one; time until its pieces are pushed to the live nodes
  and routed there, and whether the cluster then runs identical without the coordinator's copy.
- rogue: a node with an unpaired identity; the coordinator tries to use it; calls that reached its
  handlers (must be 0).
- loss: one node behind the link emulator's `bad-wifi` preset; output identical; throughput as a
  ratio of the same cluster without the link.
Default model: the tiny synthetic one (the demo model). Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster import start_node  # noqa: E402  (bench/cluster.py)
from support import stream_with_fault  # noqa: E402  (tests/support.py)

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
            prompt, params = rng.integers(0, 199_998, 6).tolist(), SamplingParams(temperature=0.8, seed=run)
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
    attempts = 0
    try:
        for _ in range(10):
            attempts += 1
            try:
                cluster.connect(Checkpoint(folder), "fast", [good[1], rogue[1]], progress=False)
            except cluster.ClusterError:
                pass
        calls = cluster.NodeClient(rogue[1], cluster.credentials(identity_dir=rogue_identity)).handshake().calls - 1
    finally:
        for p, _ in (good, rogue):
            p.kill()
    return {"attempts": attempts, "calls_reaching_rogue": int(calls)}


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
              "loss": loss_scenario(folder, work)}
    for name, r in result.items():
        print(f"{name:<7} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
