"""Tokens per round trip (issue 19): speculative decoding on one device and on a 2-node cluster
behind emulated links, with the latency model (coordinator/latency.py) beside every row. Run by
hand, not a test:

    python bench/rounds.py [-m DIR] [--tokens 32] [--ks 0,1,2,4,8] [--presets lan,wifi]

Draft sources: none (k = 0), oracle (the model's own greedy continuation from a first pass:
every draft holds, the most verification can deliver), lookup (prompt lookup on these random
weights, whose output never repeats: it finds nothing to propose) and wrong (the lookup drafter's
adaptive policy fed proposals that always fail: what failed speculation costs). Greedy decoding throughout, fast precision. The cluster is
two `moemesh node serve` processes on 127.0.0.1, each behind deploy/lab/linkem.py (a user-space
link emulator: no root, no namespace, nothing leaves loopback). Everything shares this machine's
cores, so the model's terms are measured one at a time: the coordinator's own time per round and
the experts' compute from single-device traces, a hop's overhead and the nodes' compute from a
cluster run straight on loopback, the emulator's own forwarding cost from a zero-delay link; the
model then predicts each lab row (its error is printed) and what the same cluster would do with
every device on its own CPU. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from cluster import default_model, echo_rounds, grpc_floor_us, hop_overheads_us, start_node, wire_row_bytes
from yardstick import cpu_model
from coordinator import Engine, cluster
from coordinator import latency as lm
from coordinator.drafting import DraftParams, NgramDrafter
from coordinator.models import family_of
from coordinator.sampling import SamplingParams
from coordinator.tracing import NULL_TRACER, Tracer
from expert_node import native
from expert_node.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "lab"))
from linkem import PRESETS, Link  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 150_000, 64)]  # within every family's vocabulary


class Oracle:
    """Drafts from the known greedy continuation: every one holds."""

    def __init__(self, continuation: list[int], k: int):
        self.continuation, self.k, self.seen = continuation, k, 0

    def push(self, token: int) -> None:
        self.seen += 1

    def propose(self, limit: int) -> list[int]:
        return self.continuation[self.seen:self.seen + min(self.k, limit)]

    def feedback(self, drafted: int, accepted: int) -> None:
        pass


class AlwaysWrong(NgramDrafter):
    """The real drafter's adaptive policy with proposals that always fail (the oracle's tokens
    shifted by one): what speculation costs when the text never repeats the way it guesses."""

    def __init__(self, continuation: list[int], k: int):
        super().__init__(DraftParams(k))
        self.continuation = [(t + 1) % 199_000 for t in continuation]

    def lookup(self, limit: int) -> list[int]:
        seen = len(self.history)
        return self.continuation[seen:seen + limit]


def decode(engine: Engine, n: int, k: int, source: str, continuation: list[int], tracer=None) -> dict:
    scripted = {"oracle": Oracle, "wrong": AlwaysWrong}.get(source)
    drafter = scripted(continuation, k) if scripted else None
    draft = DraftParams(k) if source == "lookup" else None
    engine.set_tracer(tracer or NULL_TRACER)
    gen = engine.stream(PROMPT, n, GREEDY, draft=draft, drafter=drafter)
    tokens = [s.token for s in gen]
    engine.set_tracer(NULL_TRACER)
    st = gen.stats
    if source == "oracle":
        assert tokens == continuation[:n], "oracle drafts changed the greedy tokens"
    return {"k": k, "source": source, "round_ms": st.decode_seconds / st.rounds * 1e3,
            "tokens_per_round": st.tokens_per_round, "decode_tps": st.decode_tps, "tokens": tokens,
            "drafted": st.drafted, "accepted": st.accepted, "chunk": 1 + st.drafted / st.rounds}


def spans_by_round(tracer: Tracer) -> list[tuple[tuple[float, float], int, list]]:
    """(window, chunk tokens, spans inside) per decode round."""
    rounds = sorted((s for s in tracer.spans if s.name == "decode" and s.track == "steps"), key=lambda s: s.start_us)
    out = []
    for s in rounds:
        a, b = s.start_us, s.start_us + s.dur_us
        out.append(((a, b), 1 + s.args.get("drafts", 0), [x for x in tracer.spans if a <= x.start_us <= b]))
    return out


def hop_costs_us(spans: list) -> list[float]:
    """Per hop: what the coordinator spends on it (serialize, round trip, deserialize) beyond the
    node's kernel time: the latency model's overhead term (the node's decode and encode in it)."""
    hops: dict[tuple, float] = {}
    for s in spans:
        if s.name in ("serialize", "round trip", "deserialize", "node compute"):
            key = (s.args["layer"], s.args["node"])
            hops[key] = hops.get(key, 0.0) + (-s.dur_us if s.name == "node compute" else s.dur_us)
    return list(hops.values())


def fit_compute(samples: list[tuple[float, float, float]]) -> lm.Compute:
    """Least squares of seconds = fixed + union * per_expert + pairs * per_pair (non-negative).
    With fewer than three chunk sizes measured (--ks 0,4) the three terms are not determined (the
    minimum-norm solution, clipped, once predicted a single device at half its speed): then
    seconds = fixed + union * per_expert, the weights streamed per distinct expert."""
    three = len({round(u, 6) for u, _, _ in samples}) >= 3
    A = np.array([[1.0, u, p] if three else [1.0, u] for u, p, _ in samples])
    y = np.array([s for _, _, s in samples])
    coef = [float(c) for c in np.maximum(np.linalg.lstsq(A, y, rcond=None)[0], 0.0)]
    return lm.Compute(*(coef if three else coef + [0.0]))


def start_linkem(target: str, link) -> tuple[subprocess.Popen, str]:
    args = ["--rtt-ms", str(link.rtt_ms), "--jitter-ms", str(link.jitter_ms), "--rate-mbit", str(link.rate_mbit)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "lab" / "linkem.py"), "--listen", "127.0.0.1:0",
                             "--connect", target, *args, "--seed", "1"], stdout=subprocess.PIPE, text=True)
    address = re.search(r"listening on (\S+) ", proc.stdout.readline()).group(1)
    return proc, address


def row_line(where: str, r: dict, predicted: float | None) -> str:
    model = f"{predicted:8.2f}  {r['decode_tps'] / predicted - 1:+6.1%}" if predicted else ""
    return (f"{where:<16}{r['source']:<8}{r['k']:>3}{r['round_ms']:>10.1f}{r['tokens_per_round']:>8.2f}"
            f"{r['decode_tps']:>9.2f}  {model}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ks", default="0,1,2,4,8")
    ap.add_argument("--presets", default="lan,wifi")
    args = ap.parse_args()
    folder = Path(args.model) if args.model else default_model()
    ks = [int(k) for k in args.ks.split(",")]
    es = family_of(Checkpoint(folder)).expert_shape(Checkpoint(folder).config)  # any family's config keys
    shape = lm.Shape(int(Checkpoint(folder).config["num_hidden_layers"]), es.n_experts, es.top_k, es.hidden)
    n = args.tokens
    print(f"machine: {cpu_model()}, kernel path {native.kernel_path()}, {native.get_threads()} threads; "
          f"model {folder} ({shape.layers} layers); greedy, fast precision, {n} tokens per run")
    print(f"{'where':<16}{'source':<8}{'k':>3}{'round ms':>10}{'tok/rnd':>8}{'tok/s':>9}  {'model':>8}  {'error':>6}")

    # single device: the rows, and the model's coordinator and expert terms from traces
    single = Engine.load(folder, precision="fast")
    single.warm(progress=False)
    decode(single, 4, 0, "none", [])  # warm threads and caches
    base = decode(single, n + 8, 0, "none", [])
    continuation = base["tokens"]
    coordinator_s, expert_samples, rows = {}, [], []
    for k in ks:
        for source in (("none",) if k == 0 else ("oracle", "lookup", "wrong")):
            tracer = Tracer()
            decode(single, n, k, source, continuation, tracer)  # traced: the model's terms
            r = decode(single, n, k, source, continuation)
            rows.append(("single", r))
            if source == "oracle" or source == "none":
                T = k + 1
                per_round = spans_by_round(tracer)
                coordinator_s[T] = float(np.median([
                    (b - a - sum(s.dur_us for s in spans if s.name == "experts")) / 1e6 for (a, b), _, spans in per_round]))
                for _, tokens, spans in per_round:
                    for s in spans:
                        if s.name == "experts":
                            expert_samples.append((lm.expected_union(shape.experts, shape.top_k, tokens),
                                                   tokens * shape.top_k, s.dur_us / 1e6))
    local = fit_compute(expert_samples)

    def coord(T: int) -> float:  # chunk sizes not measured: the nearest measured one
        return coordinator_s[min(coordinator_s, key=lambda t: abs(t - T))]

    def predicted_single(r) -> float:  # with the chunk the rounds really had (lookup may draft nothing)
        T = r["chunk"]
        return lm.decode_tps(lm.single_round_seconds(shape, coord(T), local, T), r["tokens_per_round"])

    for where, r in rows:
        print(row_line(where, r, predicted_single(r)), flush=True)
    del single

    # cluster: two nodes; loopback first (overhead and node compute), then behind linkem
    nodes = [start_node(i) for i in range(2)]
    lab_rows, errors = [], []
    overhead_us, cost_us = [], []
    try:
        def connect(addresses):
            experts, _ = cluster.connect(Checkpoint(folder), "fast", addresses, progress=False)
            engine = Engine.load(folder, precision="fast", experts=experts)
            engine.warm(progress=False)
            decode(engine, 4, 0, "none", [])
            return engine, experts

        engine, experts = connect([a for _, a in nodes])
        node_samples, one_token_hops = [], []
        for k in (0, 2, 4, 8):
            tracer = Tracer()
            decode(engine, n, k, "oracle" if k else "none", continuation, tracer)
            for _, tokens, spans in spans_by_round(tracer):
                for s in spans:
                    if s.name == "node compute":
                        share_union = lm.expected_union(shape.experts, shape.top_k, tokens) / 2
                        node_samples.append((share_union, tokens * shape.top_k / 2, s.dur_us / 1e6))
                if tokens == 1:
                    overhead_us.extend(hop_overheads_us(spans))
                    cost_us.extend(hop_costs_us(spans))
                    one_token_hops.extend(s for s in spans if s.name == "round trip")
        experts.close()
        remote = fit_compute(node_samples)
        hop_cost_s = float(np.median(cost_us)) / 1e6
        # grpcio alone: the same one-token rounds through echoes holding each request for that
        # node's time (as hop_overheads_us subtracts it) and answering its expert rows, as
        # bench/cluster.py does
        floor = grpc_floor_us(echo_rounds(one_token_hops, wire_row_bytes(shape.hidden), lambda s: s.args["node_us"]))

        def cluster_nodes(link: lm.Link, compute: lm.Compute) -> list[lm.Node]:
            return [lm.Node(link, compute, hop_cost_s, 0.5) for _ in range(2)]

        # the emulator's own forwarding cost: a zero-delay link, k = 0
        proxies = [start_linkem(a, Link()) for _, a in nodes]
        engine, experts = connect([a for _, a in proxies])
        zero = decode(engine, n, 0, "none", continuation)
        experts.close()
        for p, _ in proxies:
            p.terminate()
        emulator_s = max(0.0, (zero["round_ms"] / 1e3 - lm.cluster_round_seconds(
            shape, coord(1), cluster_nodes(lm.Link(), remote), 1)) / shape.layers)
        print(f"terms: hop overhead p50 {np.median(overhead_us):.0f} us (rtt - node time; grpc floor "
              f"{np.median(floor):.0f} us), hop cost {hop_cost_s * 1e6:.0f} us (serialize + rtt + deserialize - "
              f"node compute), "
              f"emulator {emulator_s * 1e6:.0f} us per hop, node compute per round {remote}, local {local}")

        for preset in args.presets.split(","):
            link = PRESETS[preset]
            proxies = [start_linkem(a, link) for _, a in nodes]
            engine, experts = connect([a for _, a in proxies])
            lab_link = lm.Link(link.rtt_ms / 1e3 + emulator_s, link.rate_mbit * 1e6 / 8)
            for k in ks:
                for source in (("none",) if k == 0 else ("oracle", "lookup", "wrong")):
                    r = decode(engine, n, k, source, continuation)
                    T = r["chunk"]
                    pred = lm.decode_tps(lm.cluster_round_seconds(shape, coord(T), cluster_nodes(lab_link, remote), T),
                                         r["tokens_per_round"])
                    errors.append(abs(r["decode_tps"] / pred - 1))
                    lab_rows.append((preset, r, pred))
                    print(row_line(f"2 nodes {preset}", r, pred), flush=True)
            experts.close()
            for p, _ in proxies:
                p.terminate()
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait()

    # what separate devices would do: each node computing as this machine does alone, the
    # coordinator's time as on one device, no emulator; and a phone + laptop over 3 ms Wi-Fi
    print("separate devices (model): each device as fast as this machine alone")
    separate = {}
    for preset in args.presets.split(","):
        link = PRESETS[preset]
        nodes_sep = cluster_nodes(lm.Link(link.rtt_ms / 1e3, link.rate_mbit * 1e6 / 8), local)
        for k in (0, 4):
            tps = lm.decode_tps(lm.cluster_round_seconds(shape, coord(k + 1), nodes_sep, k + 1), k + 1)
            separate[f"{preset}_oracle_k{k}"] = tps
            print(f"  2 nodes {preset:<5} k={k}: {tps:.2f} tok/s (single device {base['decode_tps']:.2f})")

    def row(where, source, k):
        for w, r in rows:
            if w == where and r["source"] == source and r["k"] == k:
                return r["decode_tps"]
        for preset, r, _ in lab_rows:
            if f"2 nodes {preset}" == where and r["source"] == source and r["k"] == k:
                return r["decode_tps"]
        return None

    print(json.dumps({
        "machine": cpu_model(), "kernel_path": native.kernel_path(), "layers": shape.layers,
        "decode_tps_single": base["decode_tps"],
        "decode_tps_cluster_wifi": row("2 nodes wifi", "none", 0),
        "decode_tps_cluster_lan": row("2 nodes lan", "none", 0),
        "decode_tps_single_oracle_k4": row("single", "oracle", 4),
        "decode_tps_cluster_wifi_oracle_k4": row("2 nodes wifi", "oracle", 4),
        "decode_tps_single_lookup": row("single", "lookup", 4),
        "decode_tps_single_wrong_k4": row("single", "wrong", 4),
        "hop_overhead_us_p50": float(np.median(overhead_us)),
        "hop_overhead_us_p99": float(np.percentile(overhead_us, 99)), "hop_cost_us_p50": hop_cost_s * 1e6,
        "grpc_floor_us_p50": float(np.median(floor)), "model_error_max": max(errors) if errors else None,
        "separate_devices": separate,
        "rows": [{"where": w, **{k: v for k, v in r.items() if k != "tokens"}} for w, r in rows] +
                [{"where": f"2 nodes {p}", "model_tps": pred, **{k: v for k, v in r.items() if k != "tokens"}}
                 for p, r, pred in lab_rows]}))


if __name__ == "__main__":
    main()
