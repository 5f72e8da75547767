"""Cluster hop benchmark on loopback (issue 5); run by hand, not a test.

    python bench/cluster.py [-m DIR] [--tokens 32]

Uses gpt-oss-20b shapes with 4 full-size layers (written by `moemesh synth` into the cache on
first use) unless -m names a checkpoint. Decodes with all experts in-process, then with two
`moemesh node serve` processes on 127.0.0.1 (one kernel thread each, so they run side by side on
this 2-core machine), and reports per hop: round trip, the node's own time (decode, queue,
compute, encode) and the difference — the software overhead of a hop — next to grpcio's own
floor measured in the same run (echoes in other processes that hold each request for the node's
time on a busy core and answer as many bytes: see grpc_floor_us) over the same transport: mutual
TLS with this device's identity as the nodes use, or plaintext for both with --insecure. The
plaintext floor is printed beside the TLS one, so TLS's own share of a hop shows. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import struct
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
from coordinator.local_node import LocalNode
from coordinator.sampling import SamplingParams
from coordinator.tracing import Tracer
from expert_node import native
from expert_node.checkpoint import Checkpoint
from expert_node.identity import (CHANNEL_TLS_OPTIONS, Identity, TrustStore, channel_credentials,
                                  server_credentials)
from expert_node.paths import cache_root


def default_model() -> Path:
    folder = cache_root() / "models" / "gpt-oss-20b-4layers"
    if not (folder / "config.json").exists():
        synth.write_checkpoint(folder, synth.make_config("gpt-oss-20b", {"num_hidden_layers": 4}), seed=0)
    return folder


def decode_tps(engine: Engine, n: int) -> float:
    gen = engine.stream(list(range(1000, 1016)), n, SamplingParams(temperature=0))
    for _ in gen:
        pass
    return gen.stats.decode_tps


def start_node(i: int, *extra: str, threads: int = 1) -> tuple[subprocess.Popen, str]:
    """A node on 127.0.0.1 (no mDNS) with `threads` kernel threads, its own folder (its id lives
    there) kept between runs unless extra names one; returns (process, address)."""
    node = LocalNode(cache_root() / "bench-nodes" / f"node{i}", "--no-mdns", "--host", "127.0.0.1", "--name",
                     f"bench{i}", *extra, env=dict(os.environ, MOEMESH_THREADS=str(threads)))
    return node.proc, node.address


ECHO_ORDER = struct.Struct("<dI")  # an echo request's head: how long to hold it, how many bytes to answer


def serve_echo(tls: bool) -> None:
    """A bidi-stream echo server (for grpc_floor_us), in this process until killed: each request
    says how long to hold it on a busy core (a node computing) and how many bytes to answer;
    with tls, over mutual TLS with this device's identity (as a bench node serves)."""

    def echo(requests, context):
        for request in requests:
            hold_us, reply_bytes = ECHO_ORDER.unpack_from(request)
            until = time.perf_counter() + hold_us * 1e-6
            while time.perf_counter() < until:
                pass
            yield bytes(reply_bytes)

    ident = lambda b: b  # noqa: E731
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=ident, response_serializer=ident)}),))
    if tls:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(Identity.load_or_create(), TrustStore()))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    print(port, flush=True)
    server.start()
    server.wait_for_termination()


class EchoStream:
    """One stream to an echo server, driven like ComputeSession (request queue, reader thread, Future)."""

    def __init__(self, channel: grpc.Channel):
        stream = channel.stream_stream("/bench.Echo/Stream", request_serializer=bytes, response_deserializer=bytes)
        self.requests: queue.Queue = queue.Queue()
        self.call = stream(iter(self.requests.get, None))
        self.pending: list[Future] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for _ in self.call:
            fut = self.pending.pop(0)
            fut.arrived = time.perf_counter()
            fut.set_result(None)

    def submit(self, payload: bytes) -> Future:
        fut: Future = Future()
        self.pending.append(fut)
        self.requests.put(payload)
        return fut

    def close(self) -> None:
        self.requests.put(None)  # the stream ends, then the reader
        self.reader.join(timeout=10)


def echo_channel(port: int, tls: bool) -> grpc.Channel:
    address = f"127.0.0.1:{port}"
    if not tls:
        return grpc.insecure_channel(address)
    creds = channel_credentials(Identity.load_or_create(), TrustStore())
    return grpc.secure_channel(address, creds, options=CHANNEL_TLS_OPTIONS)


Echo = tuple[float, int]  # one node's part of a round: (its time in us, the bytes it answered)


def wire_row_bytes(hidden: int) -> int:
    """One activation row on the wire: q16, 2 bytes a value and a float32 scale per 32 values."""
    return hidden * 2 + hidden // 32 * 4


def hop_overheads_us(spans: list) -> list[float]:
    """Per hop: the software overhead issue 19 measures, a round trip minus the node's own time
    (decode, compute, encode), from the traced round trip spans."""
    return [s.dur_us - s.args["node_us"] for s in spans if s.name == "round trip"]


def echo_rounds(hops: list, row_bytes: int, hold_us) -> list[list[Echo | None]]:
    """The decode rounds a cluster run made, for grpc_floor_us to replay: per round (one layer's
    requests, sent together), per node in a fixed order, hold_us(span) and the bytes of the expert
    rows it answered (None: that node had nothing in that round). hops: one traced span per hop
    (args layer, node, outputs)."""
    nodes = sorted({h.args["node"] for h in hops})
    rounds, current, layer = [], {}, None
    for h in sorted(hops, key=lambda s: s.start_us):
        if h.args["layer"] != layer or h.args["node"] in current:
            if current:
                rounds.append(current)
            current, layer = {}, h.args["layer"]
        current[h.args["node"]] = (float(hold_us(h)), int(h.args["outputs"]) * row_bytes)
    if current:
        rounds.append(current)
    return [[r.get(n) for n in nodes] for r in rounds]


def grpc_floor_us(rounds: list[list[Echo | None]], n: int = 1000, gap_s: float = 0.001, tls: bool = True,
                  request_bytes: int = 2880 * 2 + 400) -> np.ndarray:
    """What grpcio itself costs a hop on this machine: round trips minus the hold through echo
    processes (one per node) that do no work of ours, replaying the rounds a cluster run made
    (echo_rounds, cycled to n): each echo holds its request for that node's time on a busy core
    and answers as many bytes, the requests of a round sent at once and awaited together as
    RemoteExpertBackend does, over the transport the nodes use (tls: mutual TLS).

    The pattern matters on this VM: a thread that waited 4 ms wakes far slower than one that
    waited 0.4 (a halted vCPU), so an echo that answers at once measured 390 us where the same
    echo holding 4 ms measured 680-820; and when one node answers 1.2 ms after the other, the
    coordinator's threads fall asleep in between and wake twice: with equal holds of 1.8 ms a hop
    cost 680-700 us, with 1.8 and 0.6 ms 800-910 (the later reply's return path 170 -> 310-335 us).
    A yardstick of equal holds is one the real hop cannot reach for reasons that are not ours."""
    servers = len(rounds[0])
    procs = [subprocess.Popen([sys.executable, __file__, "--echo-server"] + (["--echo-tls"] if tls else []),
                              stdout=subprocess.PIPE, text=True) for _ in range(servers)]
    try:
        streams = [EchoStream(echo_channel(int(p.stdout.readline()), tls)) for p in procs]
        padding, times = bytes(request_bytes - ECHO_ORDER.size), []
        for i in range(n):
            parts = [(s, part) for s, part in zip(streams, rounds[i % len(rounds)]) if part is not None]
            t = time.perf_counter()
            futs = [(s.submit(ECHO_ORDER.pack(*part) + padding), part[0]) for s, part in parts]
            for fut, hold_us in futs:
                fut.result(timeout=10)
                times.append((fut.arrived - t) * 1e6 - hold_us)
            time.sleep(gap_s)
        for s in streams:
            s.close()
        return np.array(times[len(times) // 10:])
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--precision", default="fast", choices=("fast", "exact"))
    ap.add_argument("--insecure", action="store_true", help="plaintext nodes and floor (default: mutual TLS)")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--echo-tls", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        serve_echo(args.echo_tls)
        return
    folder = Path(args.model) if args.model else default_model()
    machine = f"{platform.machine()} isa={native.kernel_path()} threads={native.get_threads()}"

    single = Engine.load(folder, precision=args.precision)
    single.warm(progress=False)
    tps_single = decode_tps(single, args.tokens)

    tls = not args.insecure
    nodes = [start_node(i, *([] if tls else ["--insecure"])) for i in range(2)]
    try:
        experts, _ = cluster.connect(Checkpoint(folder), args.precision, [a for _, a in nodes], progress=False,
                                     **({} if tls else {"creds": None}))
        engine = Engine.load(folder, precision=args.precision, experts=experts)
        engine.warm(progress=False)
        decode_tps(engine, 4)  # warm the streams
        tps_cluster = decode_tps(engine, args.tokens)
        tracer = Tracer()
        engine.set_tracer(tracer)
        decode_tps(engine, args.tokens)
        decode_spans = [s for s in tracer.spans if s.args.get("tokens") == 1 and "node" in s.args]  # decode steps
        hops = [s for s in decode_spans if s.name == "round trip"]
        span_us = {name: np.array([s.dur_us for s in decode_spans if s.name == name])
                   for name in ("serialize", "deserialize", "node decode", "node compute", "node encode")}
        compute = span_us["node compute"]
        experts.close()
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait()
    rtt = np.array([h.dur_us for h in hops])
    node_time = np.array([h.args["node_us"] for h in hops])
    config = Checkpoint(folder).config
    # the same rounds without our software: an echo per node holding each request for that node's
    # time and answering its expert rows
    replay = echo_rounds(hops, wire_row_bytes(config["hidden_size"]), lambda h: h.args["node_us"])
    floor = grpc_floor_us(replay, tls=tls)
    plain_floor = grpc_floor_us(replay, tls=False) if tls else floor
    overhead = np.array(hop_overheads_us(hops))
    transport = "mutual TLS" if tls else "plaintext"
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    print(f"machine: {machine}; model: {folder} ({Checkpoint(folder).config['num_hidden_layers']} layers); "
          f"precision {args.precision}; nodes and floor over {transport}")
    print(f"{'per decode hop (us)':<28}{'p50':>10}{'p99':>10}")
    for name, a in (("coordinator serialize", span_us["serialize"]), ("round trip", rtt),
                    ("coordinator deserialize", span_us["deserialize"]), ("node total", node_time),
                    ("node decode", span_us["node decode"]), ("node compute", compute),
                    ("node encode", span_us["node encode"]),
                    ("overhead = rtt - node total", overhead), ("rtt - node compute", rtt - compute),
                    (f"gRPC floor ({transport} echo)", floor), ("gRPC floor (plaintext echo)", plain_floor)):
        print(f"{name:<28}{pct(a, 50):>10.0f}{pct(a, 99):>10.0f}")
    print(f"hop overhead p50 = {pct(overhead, 50) / pct(floor, 50):.2f} x grpcio's own floor measured in this run")
    print(f"decode: single device {tps_single:.2f} tok/s, 2-node cluster {tps_cluster:.2f} tok/s "
          f"(ratio {tps_cluster / tps_single:.2f})")
    print(json.dumps({"machine": machine, "hops": len(hops), "hop_overhead_us_p50": pct(overhead, 50),
                      "hop_overhead_us_p99": pct(overhead, 99), "hop_rtt_us_p50": pct(rtt, 50),
                      "hop_rtt_minus_compute_us_p50": pct(rtt - compute, 50),
                      "grpc_echo_floor_us_p50": pct(floor, 50), "grpc_plaintext_floor_us_p50": pct(plain_floor, 50),
                      "transport": transport,
                      "node_compute_us_p50": pct(compute, 50), "decode_tps_single": tps_single,
                      "decode_tps_cluster2": tps_cluster, "cluster2_ratio": tps_cluster / tps_single}))


if __name__ == "__main__":
    main()
