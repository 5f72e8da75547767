"""`moemesh profile`: where every millisecond of a token goes, across devices.

Runs a prefill and N decode steps untraced and traced (twice each, alternating), then summarises
the last traced run's decode steps per stage of the coordinator and per hop to each node:
count, p50, p95, p99, max and share of the decode time (hops to different nodes overlap, so node
shares can add up past 100%). The critical path of a token is the slowest node of each layer.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from .drafting import DraftParams
from .sampling import SamplingParams
from .tracing import COORDINATOR, NULL_TRACER, Tracer

COORDINATOR_STAGES = ("embed", "attention", "router", "experts", "combine", "unembed", "sample")


@dataclass
class Row:
    device: str
    kind: str
    durations_us: list

    def stats(self, total_us: float) -> dict:
        a = np.asarray(self.durations_us, dtype=np.float64)
        pct = lambda q: float(np.percentile(a, q)) / 1e3  # noqa: E731
        return {"device": self.device, "kind": self.kind, "count": int(a.size), "p50_ms": pct(50),
                "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": float(a.max()) / 1e3,
                "share": float(a.sum() / total_us) if total_us else 0.0}


def decode_windows(tracer: Tracer) -> list[tuple[float, float]]:
    """One window per decode step: from its forward pass to the next one (so the sampling of the
    token it produced is inside); the last ends with its forward pass."""
    steps = sorted((s.start_us, s.start_us + s.dur_us) for s in tracer.spans if s.name == "decode" and s.track == "steps")
    return [(a, steps[i + 1][0] if i + 1 < len(steps) else b) for i, (a, b) in enumerate(steps)]


def in_windows(t: float, windows) -> bool:
    return any(a <= t <= b for a, b in windows)


def hop_rows(tracer: Tracer) -> tuple[list[Row], float]:
    """Rows of the table for the decode phase, and the decode time they are shares of."""
    windows = decode_windows(tracer)
    total = sum(b - a for a, b in windows)
    rows: dict[tuple[str, str], list] = defaultdict(list)
    for s in tracer.spans:
        if not in_windows(s.start_us, windows):
            continue
        if s.device == COORDINATOR and s.name in COORDINATOR_STAGES:
            rows[(COORDINATOR, s.name)].append(s.dur_us)
        elif s.name in ("serialize", "deserialize"):
            rows[(s.args["node"], s.name)].append(s.dur_us)
        elif s.name == "round trip":
            rows[(s.args["node"], "round trip")].append(s.dur_us)
            rows[(s.args["node"], "wire")].append(s.args["wire_us"])
        elif s.name in ("node queue", "node compute"):
            rows[(s.device, s.name.split()[1])].append(s.dur_us)
    order = {k: i for i, k in enumerate(COORDINATOR_STAGES + ("serialize", "round trip", "wire", "queue", "compute",
                                                              "deserialize"))}
    keys = sorted(rows, key=lambda k: (k[0] != COORDINATOR, k[0], order[k[1]]))
    return [Row(dev, kind, rows[(dev, kind)]) for dev, kind in keys], total


def slowest_hops(tracer: Tracer, windows, tokens: int | None = None) -> dict[tuple[int, int], tuple[float, str, float]]:
    """Per (decode step, layer): the longest round trip's (duration us, node, wire us); with
    `tokens`, among the hops that carried that many tokens only."""
    per_layer: dict[tuple[int, int], tuple[float, str, float]] = {}
    for s in tracer.spans:
        if s.name != "round trip" or not in_windows(s.start_us, windows) or tokens not in (None, s.args["tokens"]):
            continue
        step = next(i for i, (a, b) in enumerate(windows) if a <= s.start_us <= b)
        key = (step, s.args["layer"])
        if s.dur_us > per_layer.get(key, (-1.0, "", 0.0))[0]:
            per_layer[key] = (s.dur_us, s.args["node"], s.args["wire_us"])
    return per_layer


def critical_path(tracer: Tracer) -> dict:
    """Per decode token and layer, the node whose round trip was longest."""
    windows = decode_windows(tracer)
    per_layer = slowest_hops(tracer, windows)
    if not per_layer:
        return {}
    slowest = Counter(node for _, node, _ in per_layer.values())
    per_token, wire = defaultdict(float), defaultdict(float)
    for (step, _), (dur, _, wire_us) in per_layer.items():
        per_token[step] += dur
        wire[step] += wire_us
    token_us = np.median([b - a for a, b in windows])
    return {"experts_critical_ms_p50": float(np.median(list(per_token.values()))) / 1e3,
            "network_share": float(np.median(list(wire.values())) / token_us),
            "slowest_node_share": {n: c / len(per_layer) for n, c in slowest.most_common()}}


WIFI = (3e-3, 200e6 / 8)  # a phone and a laptop on one Wi-Fi: 3 ms round trip, 200 Mbit/s (deploy/lab's wifi)


def cluster_predictions(tracer: Tracer, config) -> dict:
    """What the latency model (coordinator.latency) says this cluster would decode, from the terms
    this profile measured per decoded token: the coordinator's own time, and per node its
    compute and our overhead per hop (round trip minus compute), the experts split evenly.
    Two cases: the same devices each on their own CPU and memory (this machine shares its cores
    between all of them), and a phone coordinator with one laptop node that computes every
    expert (the nodes' compute added up), over 3 ms Wi-Fi; for the phone, its coordinator time
    is this machine's, and twice it (a phone half as fast)."""
    from . import latency as lm

    windows = decode_windows(tracer)
    compute, rtt = defaultdict(list), defaultdict(list)
    for s in tracer.spans:
        if s.name == "node compute" and in_windows(s.start_us, windows) and s.args.get("tokens") == 1:
            compute[s.args["node"]].append(s.dur_us / 1e6)
        if s.name == "round trip" and in_windows(s.start_us, windows) and s.args["tokens"] == 1:
            rtt[s.args["node"]].append(s.dur_us / 1e6)
    if not compute:
        return {}
    waits = defaultdict(float)  # per step, what the coordinator waited for the experts
    for (step, _), (us, _, _) in slowest_hops(tracer, windows, tokens=1).items():
        waits[step] += us
    coordinator_s = float(np.median([(b - a - waits[i]) / 1e6 for i, (a, b) in enumerate(windows) if i in waits]))
    shape = lm.Shape(config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok, config.hidden_size)
    nodes = [lm.Node(lm.Link(), lm.Compute(float(np.median(compute[n]))),  # placement splits the experts evenly
                     float(np.median(rtt[n]) - np.median(compute[n])), 1.0 / len(compute)) for n in compute]
    own = lm.decode_tps(lm.cluster_round_seconds(shape, coordinator_s, nodes, 1), 1)
    laptop = lm.Node(lm.Link(*WIFI), lm.Compute(sum(n.compute.fixed_s for n in nodes)),
                     float(np.median([n.overhead_s for n in nodes])), 1.0)
    phone = {f"phone_x{f}": lm.decode_tps(lm.cluster_round_seconds(shape, coordinator_s * f, [laptop], 1), 1)
             for f in (1, 2)}
    return {"coordinator_ms": coordinator_s * 1e3, "separate_devices_tps": own, **{k + "_laptop_wifi_tps": v
                                                                                  for k, v in phone.items()}}


def run_profile(engine, prompt_ids: list[int], n: int, repeats: int = 2, draft: DraftParams | None = None) -> dict:
    """Untraced and traced runs, alternating order (the second of two runs tends to be slower on a
    busy machine), so the tracing overhead is measured, not the order. With drafts, a decode step
    is a round that may yield several tokens."""
    params = SamplingParams(temperature=0)
    for _ in engine.stream(prompt_ids, 2, params):  # warm up: threads, caches, streams
        pass
    runs = {"plain": [], "traced": []}
    tracer = traced = None
    try:
        for rep in range(repeats):
            for mode in (("traced", "plain") if rep % 2 else ("plain", "traced")):
                if mode == "traced":
                    tracer = Tracer()
                engine.set_tracer(tracer if mode == "traced" else NULL_TRACER)
                gen = engine.stream(prompt_ids, n, params, draft=draft)
                for _ in gen:
                    pass
                runs[mode].append(gen)
                if mode == "traced":
                    traced = gen
    finally:
        engine.set_tracer(NULL_TRACER)
    plain_tps = float(np.median([g.stats.decode_tps for g in runs["plain"]]))
    traced_tps = float(np.median([g.stats.decode_tps for g in runs["traced"]]))
    rows, total = hop_rows(tracer)
    stats = [r.stats(total) for r in rows]
    return {"tracer": tracer, "rows": stats, "decode_ms_total": total / 1e3,
            "between_stages_share": 1 - sum(r["share"] for r in stats if r["device"] == COORDINATOR),
            "critical_path": critical_path(tracer), "prefill_tps": traced.stats.prefill_tps,
            "decode_tps_traced": traced_tps, "decode_tps_untraced": plain_tps,
            "ttft_s": float(np.median([g.stats.time_to_first_token for g in runs["plain"]])),
            "tracing_overhead": 1 - traced_tps / plain_tps if plain_tps else 0.0,
            "tokens": traced.stats.generated_tokens, "rounds": traced.stats.rounds,
            "drafted": traced.stats.drafted, "accepted": traced.stats.accepted,
            "tokens_per_round": traced.stats.tokens_per_round,
            "model": cluster_predictions(tracer, engine.config)}


def render(result: dict) -> str:
    lines = [f"{'device':<34}{'kind':<13}{'count':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'share':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['device'][:33]:<34}{r['kind']:<13}{r['count']:>6}{r['p50_ms']:>9.3f}{r['p95_ms']:>9.3f}"
                     f"{r['p99_ms']:>9.3f}{r['max_ms']:>9.3f}{r['share']:>8.1%}")
    lines.append(f"{'coordinator':<34}{'between':<13}{'':>42}{result['between_stages_share']:>8.1%}"
                 "   (Python between the stages above)")
    cp = result["critical_path"]
    if cp:
        slow = ", ".join(f"{n} {s:.0%}" for n, s in cp["slowest_node_share"].items())
        lines.append(f"critical path: experts wait {cp['experts_critical_ms_p50']:.2f} ms per token (p50), "
                     f"network {cp['network_share']:.0%} of a token; slowest node per layer: {slow}")
    lines.append(f"decode {result['decode_tps_traced']:.2f} tok/s traced, {result['decode_tps_untraced']:.2f} "
                 f"untraced (tracing overhead {result['tracing_overhead']:.1%}); prefill {result['prefill_tps']:.1f} tok/s")
    m = result.get("model")
    if m:
        lines.append(f"latency model (coordinator {m['coordinator_ms']:.1f} ms a token): these devices each on "
                     f"their own CPU and memory {m['separate_devices_tps']:.2f} tok/s; a phone coordinator + one "
                     f"laptop node on 3 ms Wi-Fi {m['phone_x1_laptop_wifi_tps']:.2f} tok/s "
                     f"({m['phone_x2_laptop_wifi_tps']:.2f} with a phone half this fast)")
    if result["drafted"]:
        lines.append(f"drafts: {result['drafted']} proposed, {result['accepted']} accepted; "
                     f"{result['tokens_per_round']:.2f} tokens per round")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "tracer"})


def require_matplotlib() -> None:
    """--plot needs matplotlib: say so before any model is loaded."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'moemesh[plot]' (or pip install matplotlib)") from None


def plot(result: dict, path: str) -> None:
    """Stacked bars of one decode token: per layer attention, router, the experts (in a cluster
    each node's network and compute apart) and combine, then the unembedding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracer: Tracer = result["tracer"]
    windows = decode_windows(tracer)
    a, b = windows[len(windows) // 2]  # a typical token: the middle one
    bars: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # x label -> part -> ms
    remote = False
    for s in tracer.spans:
        if not a <= s.start_us <= b or s.device != COORDINATOR:
            continue
        if s.name == "round trip":  # a hop: the node's own time and the rest (network + gRPC)
            remote = True
            node = s.args["node"].split()[1]
            bars[str(s.args["layer"])][f"{node} compute"] += s.args["node_us"] / 1e3
            bars[str(s.args["layer"])][f"{node} network"] += s.args["wire_us"] / 1e3
        elif "layer" in s.args and s.name in COORDINATOR_STAGES:
            bars[str(s.args["layer"])][s.name] += s.dur_us / 1e3
        elif s.name == "unembed":
            bars["unembed"]["unembed"] += s.dur_us / 1e3
    labels = sorted((k for k in bars if k != "unembed"), key=int) + (["unembed"] if "unembed" in bars else [])
    parts = [p for p in ("attention", "router", "experts", "combine", "unembed") if not (remote and p == "experts")]
    parts[3:3] = sorted({p for bar in bars.values() for p in bar if p.endswith(("compute", "network"))})
    fig, ax = plt.subplots(figsize=(11, 4))
    bottom = np.zeros(len(labels))
    for part in parts:
        v = np.array([bars[x][part] for x in labels])
        if v.any():
            ax.bar(labels, v, bottom=bottom, label=part)
            bottom += v
    ax.set_xlabel("layer")
    ax.set_ylabel("ms")
    ax.set_title("one decode token")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
