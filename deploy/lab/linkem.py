#!/usr/bin/env python3
"""linkem: a user-space TCP proxy that emulates a network link (this kernel has no `tc netem`).

    python deploy/lab/linkem.py --listen 127.0.0.1:0 --connect 127.0.0.1:7070 --preset wifi
    python deploy/lab/linkem.py --listen 10.77.0.1:7070 --connect 10.77.0.11:7070 --rtt-ms 3 --jitter-ms 1

Per direction, every chunk read from one side is written to the other after:
- latency: half the round-trip time (`--rtt-ms`, the figure a ping shows), plus
- jitter: a normal sample with `--jitter-ms` standard deviation (half per direction), clipped so
  the chunk never overtakes the previous one (TCP delivers in order);
- bandwidth: serialisation at `--rate-mbit` (chunks queue behind each other);
- loss: TCP hides loss, so it is emulated as what a sender sees: each 1448-byte segment is lost
  with probability `--loss`, and a chunk with a lost segment is held back for one tail-loss-probe
  time, max(2 x RTT, 10 ms) (Linux's TLP timer), before delivery.
Prints "linkem listening on HOST:PORT" once ready. Stops on SIGTERM/SIGINT.

Threads, not asyncio: a delivery thread sleeps until each chunk's time with the kernel's
nanosecond sleep, where asyncio's timers wait in epoll, which counts in whole milliseconds and
rounds up — a 0.3 ms link (the lan preset) measured a 3 ms round trip that way, a 3 ms one 5 ms.
"""
from __future__ import annotations

import argparse
import queue
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

SEGMENT = 1448  # TCP payload of a 1500-byte Ethernet frame


@dataclass(frozen=True)
class Link:
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float = 0.0  # 0 = unlimited
    loss: float = 0.0

    def one_way_s(self, rng: random.Random) -> float:
        jitter = rng.gauss(0.0, self.jitter_ms / 2) if self.jitter_ms else 0.0
        return max(0.0, self.rtt_ms / 2 + jitter) / 1e3

    def loss_penalty_s(self, nbytes: int, rng: random.Random) -> float:
        if not self.loss:
            return 0.0
        segments = -(-nbytes // SEGMENT)
        lost = rng.random() < 1 - (1 - self.loss) ** segments
        return max(2 * self.rtt_ms, 10.0) / 1e3 if lost else 0.0


PRESETS = {
    "lan": Link(rtt_ms=0.3),
    "wifi": Link(rtt_ms=3.0, jitter_ms=1.0, rate_mbit=200.0),
    "bad-wifi": Link(rtt_ms=15.0, jitter_ms=8.0, rate_mbit=50.0, loss=0.01),
}


def pump(src: socket.socket, dst: socket.socket, link: Link, rng: random.Random) -> None:
    """Copy one direction, each chunk delivered at its emulated time, in order: this thread reads
    and stamps, a second one sleeps until each stamp and writes."""
    chunks: queue.SimpleQueue = queue.SimpleQueue()

    def deliver() -> None:
        try:
            while (item := chunks.get()) is not None:
                at, data = item
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            end_writes(dst)

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    last_at, link_free = 0.0, 0.0
    try:
        while data := src.recv(65536):
            now = time.monotonic()
            start = max(now, link_free)  # the link sends one chunk at a time
            tx = len(data) * 8 / (link.rate_mbit * 1e6) if link.rate_mbit else 0.0
            link_free = start + tx
            at = max(link_free + link.one_way_s(rng) + link.loss_penalty_s(len(data), rng), last_at)
            last_at = at
            chunks.put((at, data))
    except OSError:
        pass
    finally:
        chunks.put(None)
        sender.join()


def end_writes(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def no_delay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each chunk leaves when delivered
    return sock


def relay(client: socket.socket, connect: tuple[str, int], link: Link, seed: int) -> None:
    """One connection: both directions through the link until both ends closed."""
    try:
        server = no_delay(socket.create_connection(connect))
    except OSError:
        client.close()
        return
    no_delay(client)
    back = threading.Thread(target=pump, args=(server, client, link, random.Random(seed + 1)), daemon=True)
    back.start()
    pump(client, server, link, random.Random(seed))
    back.join()
    client.close()
    server.close()


def serve(listen: str, connect: str, link: Link, seed: int | None) -> None:
    lhost, lport = listen.rsplit(":", 1)
    chost, cport = connect.rsplit(":", 1)
    seeds = random.Random(seed)
    listener = socket.create_server((lhost, int(lport)))
    host, port = listener.getsockname()[:2]
    print(f"linkem listening on {host}:{port} -> {connect} ({link})", flush=True)
    while True:  # until a signal ends the process; open connections just end with it
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, (chost, int(cport)), link, seeds.randrange(1 << 30)),
                         daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0 = any)")
    ap.add_argument("--connect", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--preset", choices=list(PRESETS), help="lan, wifi or bad-wifi (flags below override)")
    ap.add_argument("--rtt-ms", type=float)
    ap.add_argument("--jitter-ms", type=float)
    ap.add_argument("--rate-mbit", type=float)
    ap.add_argument("--loss", type=float)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    base = PRESETS[args.preset] if args.preset else Link()
    link = Link(*(getattr(args, f) if getattr(args, f) is not None else getattr(base, f)
                  for f in ("rtt_ms", "jitter_ms", "rate_mbit", "loss")))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    serve(args.listen, args.connect, link, args.seed)


if __name__ == "__main__":
    main()
