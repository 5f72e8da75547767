"""Cluster hop benchmark on loopback (issue 5); run by hand, not a test.

    python bench/cluster.py [-m DIR] [--tokens 32]

Uses gpt-oss-20b shapes with 4 full-size layers (written by `moemesh synth` into the cache on
first use) unless -m names a checkpoint. Decodes with all experts in-process, then with two
`moemesh node serve` processes on 127.0.0.1 (one kernel thread each, so they run side by side on
this 2-core machine), and reports per hop: round trip, the node's own time (decode, queue,
compute, encode) and the difference — the software overhead of a hop — next to grpcio's own
floor measured in the same run (an echo in another process that does no work). Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np

from coordinator import Engine, cluster, synth
from coordinator.sampling import SamplingParams
from coordinator.tokenizer import cache_dir
from coordinator.tracing import Tracer
from expert_node import native
from expert_node.checkpoint import Checkpoint


def default_model() -> Path:
    folder = cache_dir() / "models" / "gpt-oss-20b-4layers"
    if not (folder / "config.json").exists():
        synth.write_checkpoint(folder, synth.make_config("gpt-oss-20b", {"num_hidden_layers": 4}), seed=0)
    return folder


def decode_tps(engine: Engine, n: int) -> float:
    gen = engine.stream(list(range(1000, 1016)), n, SamplingParams(temperature=0))
    for _ in gen:
        pass
    return gen.stats.decode_tps


def start_node(i: int, *extra: str, threads: int = 1) -> tuple[subprocess.Popen, str]:
    """A node on 127.0.0.1 (no mDNS) with `threads` kernel threads; returns (process, address)."""
    env = dict(os.environ, MOEMESH_THREADS=str(threads))
    if "--cache-dir" not in extra:  # each node its own folder (its id lives there); kept between runs
        extra = ("--cache-dir", str(cache_dir() / "bench-nodes" / f"node{i}"), *extra)
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "node", "serve", "--port", "0", "--no-mdns",
                             "--host", "127.0.0.1", "--name", f"bench{i}", *extra], stdout=subprocess.PIPE, text=True,
                            env=env, cwd="/")
    port = re.search(r"port (\d+)", proc.stdout.readline()).group(1)
    return proc, f"127.0.0.1:{port}"


def serve_echo() -> None:
    """A bidi-stream echo server (for grpc_floor_us), in this process until killed."""
    def echo(requests, context):
        yield from requests

    ident = lambda b: b  # noqa: E731
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=ident, response_serializer=ident)}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


def grpc_floor_us(n: int = 2000) -> np.ndarray:
    """Round trips of one token's activations through an echo in another process that does no
    work, driven like ComputeSession (request queue, reader thread, Future), 1 ms apart: what
    grpcio itself costs a hop on this machine, the floor under hop_overhead."""
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{int(proc.stdout.readline())}")
        stream = channel.stream_stream("/bench.Echo/Stream", request_serializer=bytes, response_deserializer=bytes)
        requests: queue.Queue = queue.Queue()
        call = stream(iter(requests.get, None))
        pending: list[Future] = []

        def read():
            for reply in call:
                pending.pop(0).set_result(reply)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        payload, times = bytes(2880 * 2 + 400), []
        for _ in range(n):
            fut: Future = Future()
            pending.append(fut)
            t = time.perf_counter()
            requests.put(payload)
            fut.result(timeout=10)
            times.append((time.perf_counter() - t) * 1e6)
            time.sleep(0.001)
        requests.put(None)  # the stream ends, then the reader
        reader.join(timeout=10)
        return np.array(times[n // 10:])
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--precision", default="fast", choices=("fast", "exact"))
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        serve_echo()
        return
    folder = Path(args.model) if args.model else default_model()
    machine = f"{platform.machine()} isa={native.kernel_path()} threads={native.get_threads()}"

    single = Engine.load(folder, precision=args.precision)
    single.warm(progress=False)
    tps_single = decode_tps(single, args.tokens)

    nodes = [start_node(i) for i in range(2)]
    try:
        experts, _ = cluster.connect(Checkpoint(folder), args.precision, [a for _, a in nodes], progress=False)
        engine = Engine.load(folder, precision=args.precision, experts=experts)
        engine.warm(progress=False)
        decode_tps(engine, 4)  # warm the streams
        tps_cluster = decode_tps(engine, args.tokens)
        tracer = Tracer()
        engine.set_tracer(tracer)
        decode_tps(engine, args.tokens)
        hops = [s for s in tracer.spans if s.name == "round trip" and s.args["tokens"] == 1]  # decode steps
        compute = np.array([s.dur_us for s in tracer.spans if s.name == "node compute" and s.args["tokens"] == 1])
        experts.close()
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait()
    floor = grpc_floor_us()
    rtt = np.array([h.dur_us for h in hops])
    node_time = np.array([h.args["node_us"] for h in hops])
    overhead = rtt - compute
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    print(f"machine: {machine}; model: {folder} ({Checkpoint(folder).config['num_hidden_layers']} layers); "
          f"precision {args.precision}")
    print(f"{'per decode hop (us)':<28}{'p50':>10}{'p99':>10}")
    for name, a in (("round trip", rtt), ("node total", node_time), ("node compute", compute),
                    ("overhead = rtt - compute", overhead), ("wire + gRPC = rtt - node", rtt - node_time),
                    ("gRPC floor (echo, no work)", floor)):
        print(f"{name:<28}{pct(a, 50):>10.0f}{pct(a, 99):>10.0f}")
    print(f"hop overhead p50 = {pct(overhead, 50) / pct(floor, 50):.2f} x grpcio's own floor measured in this run")
    print(f"decode: single device {tps_single:.2f} tok/s, 2-node cluster {tps_cluster:.2f} tok/s "
          f"(ratio {tps_cluster / tps_single:.2f})")
    print(json.dumps({"machine": machine, "hops": len(hops), "hop_overhead_us_p50": pct(overhead, 50),
                      "hop_overhead_us_p99": pct(overhead, 99), "hop_rtt_us_p50": pct(rtt, 50),
                      "grpc_echo_floor_us_p50": pct(floor, 50),
                      "node_compute_us_p50": pct(compute, 50), "decode_tps_single": tps_single,
                      "decode_tps_cluster2": tps_cluster, "cluster2_ratio": tps_cluster / tps_single}))


if __name__ == "__main__":
    main()
