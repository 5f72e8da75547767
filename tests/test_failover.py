"""A cluster that survives devices leaving: nodes killed (-9) or frozen (SIGSTOP) mid-generation;
the token stream goes on identical to a single device, and a node that comes back is used again."""
import signal
import time

import numpy as np
import pytest

from coordinator import Engine, cluster
from coordinator.sampling import SamplingParams
from coordinator.tracing import Tracer
from expert_node.checkpoint import Checkpoint
from support import alone, free_port, prompts, run_batched, stream_with_fault, wait_until

pytestmark = pytest.mark.timeout(600)
KILL_RUNS = 20
TOKENS = 14


def test_kill_minus_nine_mid_generation(tiny_dir, start_node, tmp_path):
    ports = [free_port() for _ in range(3)]
    caches = [tmp_path / f"n{i}" for i in range(3)]
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1", "--port", str(p), cache_dir=c) for p, c in zip(ports, caches)]
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [n.address for n in nodes], replicas=2,
                                 progress=False, local_fallback=False)
    remote, local = Engine.load(tiny_dir, "fast", experts=experts), Engine.load(tiny_dir, "fast")
    rng = np.random.default_rng(0)
    longest_stall = 0.0
    for run in range(KILL_RUNS):
        prompt = rng.integers(0, 199_998, 6).tolist()
        params = SamplingParams(temperature=0.8, seed=run)
        expected = [s.token for s in local.stream(prompt, TOKENS, params)]
        victim, kill_at = run % 3, int(rng.integers(1, TOKENS - 2))
        got, stall = stream_with_fault(remote, prompt, TOKENS, params, kill_at,
                                       lambda: nodes[victim].stop(signal.SIGKILL))
        longest_stall = max(longest_stall, stall)
        assert got == expected, f"run {run}: tokens differ after killing node {victim} at token {kill_at}"
        node_id = next(n for n in experts.clients if experts.clients[n].address == nodes[victim].address)
        nodes[victim] = start_node("--no-mdns", "--host", "127.0.0.1", "--port", str(ports[victim]),
                                   cache_dir=caches[victim])
        assert wait_until(lambda: experts.is_up(node_id), 10), f"run {run}: restarted node not used again"
    print(f"{KILL_RUNS} runs identical; longest stall {longest_stall * 1e3:.0f} ms")
    experts.close()


def test_node_killed_while_a_batch_decodes(tiny_dir, start_node):
    """Four sequences sharing every round: a node killed mid-batch, its work goes to the replicas
    and every sequence's tokens stay those of a single device."""
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(3)]
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [n.address for n in nodes], replicas=2,
                                 progress=False, local_fallback=False)
    remote, local = Engine.load(tiny_dir, "fast", experts=experts), Engine.load(tiny_dir, "fast")
    jobs = [(p, TOKENS, SamplingParams(temperature=0.8, seed=i), None) for i, p in enumerate(prompts(4))]

    def kill_after_two_tokens(outs):
        assert wait_until(lambda: min(len(c.tokens) for c in outs) >= 2, 60)
        nodes[0].stop(signal.SIGKILL)

    outs = run_batched(remote, jobs, during=kill_after_two_tokens)
    for (prompt, n, params, _), c in zip(jobs, outs):
        assert c.error is None
        assert c.tokens == alone(local, prompt, n, params)
    assert not all(experts.is_up(n) for n in experts.clients)  # the kill was seen, not missed
    experts.close()


def test_frozen_node_is_detected_and_used_again_after_thaw(tiny_dir, start_node):
    a, b = start_node("--no-mdns", "--host", "127.0.0.1"), start_node("--no-mdns", "--host", "127.0.0.1")
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [a.address, b.address], replicas=2, progress=False,
                                 local_fallback=False)
    remote, local = Engine.load(tiny_dir, "fast", experts=experts), Engine.load(tiny_dir, "fast")
    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0)
    expected = [s.token for s in local.stream(prompt, 30, params)]
    assert [s.token for s in remote.stream(prompt, 30, params)] == expected  # warm: deadlines observed
    a_id = next(n for n, c in experts.clients.items() if c.address == a.address)
    deadline = experts.deadlines.deadline(a_id, 1)
    a.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        assert [s.token for s in remote.stream(prompt, 30, params)] == expected
        down = [t for t, n, what in experts.events if n == a_id and what.startswith("down")]
        assert down, "the frozen node was never marked down"
        detected = down[0] - frozen_at
        assert detected <= 2 * deadline + 0.05, f"detected after {detected * 1e3:.0f} ms, deadline {deadline * 1e3:.0f} ms"
    finally:
        a.proc.send_signal(signal.SIGCONT)
    thawed = time.monotonic()
    assert wait_until(lambda: experts.is_up(a_id), 5.0), "the thawed node was not used again within 5 s"
    print(f"frozen node detected in {detected * 1e3:.0f} ms (deadline {deadline * 1e3:.0f} ms); "
          f"back after {(time.monotonic() - thawed) * 1e3:.0f} ms")
    tracer = Tracer()
    remote.set_tracer(tracer)
    assert [s.token for s in remote.stream(prompt, 8, params)] == expected[:8]
    assert any(s.name == "round trip" and a.address in s.args["node"] for s in tracer.spans)
    experts.close()


def test_last_resort_is_the_coordinators_own_copy(tiny_dir, start_node):
    node = start_node("--no-mdns", "--host", "127.0.0.1")
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "exact", [node.address], progress=False)
    remote, local = Engine.load(tiny_dir, "exact", experts=experts), Engine.load(tiny_dir, "exact")
    prompt, params = [9, 10, 11], SamplingParams(temperature=0)
    expected = [s.token for s in local.stream(prompt, 12, params)]
    # the only node: every expert falls back to the coordinator
    got, _ = stream_with_fault(remote, prompt, 12, params, 3, lambda: node.stop(signal.SIGKILL))
    assert got == expected
    experts.close()


def test_bad_wifi_link_gives_identical_output(tiny_dir, start_node):
    from support import LinkProcess

    a, b = start_node("--no-mdns", "--host", "127.0.0.1"), start_node("--no-mdns", "--host", "127.0.0.1")
    link = LinkProcess(b.address, "--preset", "bad-wifi", "--seed", "3")
    try:
        experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [a.address, link.address], replicas=2,
                                     progress=False)
        remote, local = Engine.load(tiny_dir, "fast", experts=experts), Engine.load(tiny_dir, "fast")
        for seed in range(3):
            prompt, params = [40 + seed, 41, 42], SamplingParams(temperature=0.7, seed=seed)
            assert [s.token for s in remote.stream(prompt, 12, params)] == \
                   [s.token for s in local.stream(prompt, 12, params)]
        experts.close()
    finally:
        link.stop()


def test_placement_is_repaired_onto_live_nodes(tiny_dir, start_node):
    """No replicas: a killed node's experts are computed by the coordinator only until the repair
    has pushed them to the live nodes; after it, the cluster runs without the coordinator's copy."""
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(3)]
    experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [n.address for n in nodes], progress=False)
    remote, local = Engine.load(tiny_dir, "fast", experts=experts), Engine.load(tiny_dir, "fast")
    prompt, params = [21, 22, 23], SamplingParams(temperature=0.9, seed=4)
    expected = [s.token for s in local.stream(prompt, 16, params)]
    victim = next(n for n, c in experts.clients.items() if c.address == nodes[1].address)
    orphans = set(experts.placement.pieces_of(victim))
    got, _ = stream_with_fault(remote, prompt, 16, params, 2, lambda: nodes[1].stop(signal.SIGKILL))
    assert got == expected
    assert wait_until(lambda: any(what.startswith("repaired") for _, _, what in experts.events), 30), experts.events
    survivors = [n for n in experts.clients if n != victim]
    hosted = set()
    for n in survivors:
        hosted |= cluster.hosted_pieces(experts.clients[n].handshake())
    assert orphans <= hosted, "the dead node's pieces are not loaded on the live nodes"
    assert all(experts.placement.hosts[l][e][0] in survivors for l, e in orphans)
    experts.local = None  # without the last resort, any piece left on the dead node would raise
    assert [s.token for s in remote.stream(prompt, 16, params)] == expected
    experts.close()
