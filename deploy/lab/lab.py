#!/usr/bin/env python3
"""A lab of real hosts on one machine (needs root): network namespaces on a private bridge.

    sudo .venv/bin/python deploy/lab/lab.py up --nodes 3 --preset wifi  # until Ctrl-C or SIGTERM, then cleans up
    sudo .venv/bin/python deploy/lab/lab.py down                        # removes leftovers of a crashed lab

Run it with a python that has moemesh installed (the virtualenv's), or with `moemesh` on PATH.

Hosts: `coord` (10.77.0.1) and `node1..N` (10.77.0.11..). Every host has one veth on a bridge that
lives in its own namespace, so nothing touches the machine's real interfaces; multicast crosses
the bridge, so mDNS works between hosts. Each node listens on 127.0.0.1 inside its namespace and
is reached through deploy/lab/linkem.py on its bridge address: every byte to or from a node
crosses the emulated link (preset lan, wifi or bad-wifi). Teardown kills every process in the
lab's namespaces and deletes them, also after a failure.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINKEM = HERE / "linkem.py"
PREFIX = "mmlab"
SUBNET = "10.77.0"
NODE_PORT, INNER_PORT = 7070, 7071


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


class Lab:
    def __init__(self, n_nodes: int, preset: str | None = "lan", tag: str | None = None):
        self.n_nodes, self.preset = n_nodes, preset
        self.tag = tag or uuid.uuid4().hex[:6]
        self.switch = f"{PREFIX}-{self.tag}-sw"
        self.hosts = {"coord": f"{SUBNET}.1"} | {f"node{i}": f"{SUBNET}.{10 + i}" for i in range(1, n_nodes + 1)}
        self.procs: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{self.tag}-{host}"

    def __enter__(self) -> "Lab":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (host, ip) in enumerate(self.hosts.items()):
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            outer = f"v{self.tag}{i}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", outer, "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", outer, "master", "br0", "up")
            for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{ip}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up", "multicast", "on"],
                        ["route", "add", "224.0.0.0/4", "dev", "eth0"]):
                sh("ip", "-n", ns, *cmd)

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        for ns in [self.ns(h) for h in self.hosts] + [self.switch]:
            remove_namespace(ns)

    def popen(self, host: str, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kw)
        self.procs.append(p)
        return p

    def run(self, host: str, cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *cmd], capture_output=True, text=True,
                              timeout=timeout, **kw)

    def start_node(self, i: int, cache_dir: Path, extra: list[str] = (), python: str = sys.executable) -> str:
        """An expert node on node<i>, reached through the emulated link; returns its address."""
        host, ip = f"node{i}", self.hosts[f"node{i}"]
        node = self.popen(host, [*moemesh_command(python), "node", "serve", "--host", "127.0.0.1",
                                 "--port", str(INNER_PORT), "--advertise-port", str(NODE_PORT), "--interface", ip,
                                 "--name", host, "--cache-dir", str(cache_dir), *extra],
                          stdout=subprocess.PIPE, text=True, cwd="/")
        line = node.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"{host}: node did not start: {line!r}")
        link = [python, str(LINKEM), "--listen", f"{ip}:{NODE_PORT}", "--connect", f"127.0.0.1:{INNER_PORT}"]
        if self.preset:
            link += ["--preset", self.preset]
        proxy = self.popen(host, link, stdout=subprocess.PIPE, text=True)
        if "listening" not in proxy.stdout.readline():
            raise RuntimeError(f"{host}: link emulator did not start")
        return f"{ip}:{NODE_PORT}"


class LabError(RuntimeError):
    """The lab cannot start as asked; the message says what to do."""


def moemesh_command(python: str = sys.executable) -> list[str]:
    """How to run moemesh in the lab's hosts: this python's package, else `moemesh` on PATH."""
    if python != sys.executable or importlib.util.find_spec("coordinator") is not None:
        return [python, "-m", "coordinator.cli"]
    found = shutil.which("moemesh")
    if found:
        return [found]
    raise LabError(f"moemesh is not installed for {sys.executable}: run the lab with the virtualenv's python "
                   f"(sudo .venv/bin/python deploy/lab/lab.py ...) or put `moemesh` on PATH")


def remove_namespace(ns: str) -> None:
    """Kill whatever still runs in the namespace, then delete it (its veth goes with it)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sh("ip", "netns", "del", ns, check=False)


def cleanup_all() -> int:
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.startswith(PREFIX)]
    for ns in names:
        remove_namespace(ns)
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description="moemesh multi-host lab (root)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--preset", choices=("lan", "wifi", "bad-wifi"), default="lan")
    up.add_argument("--cache-dir", default="/tmp/moemesh-lab")
    sub.add_parser("down")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the lab needs root (network namespaces)")
    if args.cmd == "down":
        print(f"removed {cleanup_all()} lab namespaces")
        return
    # Block both signals before anything starts, so they wait for sigwait below and teardown
    # always runs (SIGTERM's default action once ended the lab with its namespaces left behind).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        moemesh_command()
        with Lab(args.nodes, args.preset) as lab:
            for i in range(1, args.nodes + 1):
                print(f"node{i}: {lab.start_node(i, Path(args.cache_dir) / f'node{i}')} ({args.preset})", flush=True)
            print(f"coordinator namespace: {lab.ns('coord')} ({lab.hosts['coord']}); try:\n"
                  f"  ip netns exec {lab.ns('coord')} moemesh cluster up --expect {args.nodes} "
                  f"--interface {lab.hosts['coord']}", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("lab removed", flush=True)
    except (RuntimeError, subprocess.CalledProcessError) as e:  # LabError included
        detail = getattr(e, "stderr", "") or ""
        sys.exit(f"lab: {e} {detail.strip()}".strip())


if __name__ == "__main__":
    main()
