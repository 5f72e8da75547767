"""Concurrent clients against `moemesh serve` (issue 20); run by hand, not a test.

    python bench/serve.py [-m DIR] [--clients 1,2,4,8] [--tokens 64] [--presets wifi]

A real server process (fast precision, no speculation, so batching alone is measured), first on
this device alone, then with its experts on two `moemesh node serve` processes behind the lab's
link emulator. For each client count, every client streams one /v1/completions request of
--tokens tokens at once (raw completions: no stop token ends one early). Per row: aggregate decode
tok/s (every token the clients received over the wall time from the first request to the last
token), per-request tok/s after the first token, time to first token p50/p99, and the ratio to one
client; on this device alone, beside it, the bound a memory-bound engine could reach at most over
one client (bandwidth_bounds: the dense weights read once a step, the experts' union growing with the
clients). Last line JSON with aggregate_tps_single, bandwidth_bound_single and
aggregate_tps_cluster_<preset> per count.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from cluster import default_model, start_node
from rounds import PRESETS, start_linkem
from yardstick import cpu_model

ROOT = Path(__file__).resolve().parent.parent


def start_server(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "-m", str(folder), "--port", "0",
                             "--precision", "fast", "--draft", "0", "--parallel", "8", *extra],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    url = re.search(r"(http://\S+:\d+)/", proc.stdout.readline()).group(1)
    return proc, url


def one_request(client, i: int, tokens: int, out: list) -> None:
    t0 = time.perf_counter()
    first = None
    for chunk in client.completions.create(model="x", prompt=f"Request {i}: the history of the river",
                                           max_tokens=tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
    end = time.perf_counter()
    out.append({"start": t0, "first": first or end, "end": end, "tokens": tokens})


def measure(url: str, clients: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    # warm: 32 tokens route to nearly every expert of every layer (random routers: 32 x 4 of 32),
    # so the first row measured does not pay the page faults of the mapped checkpoint (a 4-token
    # warm-up left one client's first token at 1.66 s against four clients' 1.27 s, full size)
    one_request(client, -1, 32, [])
    results: list[dict] = []
    threads = [threading.Thread(target=one_request, args=(client, i, tokens, results)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    ttft = np.array([r["first"] - r["start"] for r in results])
    per = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in results if r["end"] > r["first"]]
    return {"clients": clients, "aggregate_tps": sum(r["tokens"] for r in results) / (end - start),
            "per_request_tps": float(np.mean(per)), "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
            "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3)}


def bandwidth_bounds(folder: Path, counts: list[int]) -> dict[int, float]:
    """The most n clients' decoding can gain over counts[0] clients' on a device that streams
    weights at a fixed rate: a step of n sequences reads the dense weights once and the union of
    the experts they route to. With each token's k of E experts independent and uniform (the
    synthetic routers' case; real models route more alike, which raises the bound), the union
    holds E (1 - (1 - k/E)^n) experts a layer on average, so a step gives n / (D + E (1 - (1 -
    k/E)^n) X) tokens a byte, D the dense bytes a token reads, X one expert's bytes in every layer."""
    from coordinator import Engine

    engine = Engine.load(folder, precision="fast")  # mapped: only the sizes are read
    experts = {id(a) for a in engine.expert_arrays()}
    dense = sum(a.nbytes for a in engine.weight_arrays() if id(a) not in experts)
    dense -= engine.model.embed.nbytes - engine.model.embed[0].nbytes  # one row of the table a token
    backend = engine.model.experts
    expert = sum(type(w).piece_nbytes(backend.shape) for w in backend.layers.values())
    k, E = engine.config.num_experts_per_tok, engine.config.num_local_experts
    tokens_a_byte = {n: n / (dense + E * (1 - (1 - k / E) ** n) * expert) for n in counts}
    return {n: tokens_a_byte[n] / tokens_a_byte[counts[0]] for n in counts}


def run_rows(where: str, url: str, counts: list[int], tokens: int, bounds: dict | None = None) -> list[dict]:
    rows = [dict(where=where, **measure(url, c, tokens)) for c in counts]
    for r in rows:
        bound = f"{bounds[r['clients']]:>8.2f}x" if bounds else ""
        print(f"{where:<14}{r['clients']:>8}{r['aggregate_tps']:>12.2f}{r['aggregate_tps'] / rows[0]['aggregate_tps']:>8.2f}x"
              f"{r['per_request_tps']:>12.2f}{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>10.0f}{bound}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--presets", default="wifi")
    args = ap.parse_args()
    folder = Path(args.model) if args.model else default_model()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"cpu: {cpu_model()}; model: {folder}; {args.tokens} tokens per request")
    bounds = bandwidth_bounds(folder, counts)
    print(f"{'where':<14}{'clients':>8}{'agg tok/s':>12}{'vs 1':>9}{'per-req':>12}{'ttft p50':>10}{'p99 ms':>10}"
          f"{'bound':>9}")
    summary: dict = {"machine": cpu_model(), "bandwidth_bound_single": bounds}
    proc, url = start_server(folder)
    try:
        rows = run_rows("single", url, counts, args.tokens, bounds)
    finally:
        proc.terminate()
        proc.wait()
    summary["aggregate_tps_single"] = {r["clients"]: r["aggregate_tps"] for r in rows}
    nodes = [start_node(i) for i in range(2)]  # TLS, with this device's own identity (as bench/cluster.py)
    try:
        for preset in args.presets.split(","):
            proxies = [start_linkem(a, PRESETS[preset]) for _, a in nodes]
            proc, url = start_server(folder, "--cluster", *[x for _, a in proxies for x in ("--node", a)])
            try:
                rows = run_rows(f"2 nodes {preset}", url, counts, args.tokens)
            finally:
                proc.terminate()
                proc.wait()
                for p, _ in proxies:
                    p.terminate()
            summary[f"aggregate_tps_cluster_{preset}"] = {r["clients"]: r["aggregate_tps"] for r in rows}
    finally:
        for p, _ in nodes:
            p.terminate()
            p.wait()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
