"""Helpers shared by the tests (importable: pytest's pythonpath includes tests/)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from coordinator.batching import Scheduler
from coordinator.local_node import LocalNode
from coordinator.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
TESTS = Path(__file__).resolve().parent
MOEMESH = [sys.executable, "-m", "coordinator.cli"]


class NodeProcess(LocalNode):
    """`moemesh node serve` for a test: its stderr in node.log beside its cache, run from tests/."""

    def __init__(self, cache_dir, *args, netns=None):
        super().__init__(cache_dir, *args, netns=netns, log=Path(cache_dir) / "node.log", cwd=TESTS)
        self.log = Path(cache_dir) / "node.log"


ROOT = TESTS.parent
LINKEM = ROOT / "deploy" / "lab" / "linkem.py"


class LinkProcess:
    """deploy/lab/linkem.py in a subprocess: an emulated link in front of `target`."""

    def __init__(self, target: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(LINKEM), "--listen", "127.0.0.1:0", "--connect", target,
                                      *args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"linkem did not start: {line!r}")
        self.address = f"{m.group(1)}:{m.group(2)}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


def stream_with_fault(engine, prompt, n, params, at, fault) -> tuple[list[int], float]:
    """Generate n tokens, calling fault() right after token `at` (kill or freeze a node); returns
    the tokens and the longest gap between two tokens: the stall the failover cost. Shared by the
    failover tests and bench/faults.py."""
    tokens, longest, last = [], 0.0, time.perf_counter()
    for i, step in enumerate(engine.stream(prompt, n, params)):
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
        tokens.append(step.token)
        if i == at:
            fault()
    return tokens, longest


def require_tools(*tools: str, install: str) -> None:
    """Skip with the install line when a system tool is missing on a newcomer's machine; fail in
    CI (CI=true), whose .ci/run installs them, so nothing is silently lost there."""
    import pytest

    missing = [t for t in tools if not shutil.which(t)]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed ({install})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a node restarted on the same address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


class ServeProcess:
    """`moemesh serve` on port 0 in a subprocess (optionally in a network namespace); its log in a temp file."""

    def __init__(self, *args, netns=None):
        cmd = MOEMESH + ["serve", "--port", "0", *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=TESTS)
        line = self.proc.stdout.readline()
        m = re.search(r"(http://\S+:\d+)/", line)
        if not m:
            self.stop()
            raise RuntimeError(f"serve did not start: {line!r} {self.stderr()}")
        self.url = m.group(1)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, key: str, **kw):
        """The official openai client for this server."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


# -- continuous batching: submit several requests at once, collect each one's tokens ------------
def prompts(n: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 1000, length + 3 * i)] for i in range(n)]


class Collector:
    """deliver() target: the tokens of one request, its error, and when it ended."""

    def __init__(self):
        self.tokens, self.error, self.done = [], None, threading.Event()

    def __call__(self, item):
        if isinstance(item, Exception):
            self.error = item
            self.done.set()
        elif item is None:
            self.done.set()
        else:
            self.tokens += [s.token for s in item]


def alone(engine, prompt, n, params=GREEDY, draft=None) -> list[int]:
    return [s.token for s in engine.stream(prompt, n, params, draft=draft)]


def run_batched(engine, jobs, parallel=4, during=None) -> list[Collector]:
    """jobs: (prompt, max_tokens, params, draft); all submitted at once. during(collectors), if
    given, runs while they decode (a fault to inject)."""
    scheduler = Scheduler(engine, parallel=parallel)
    try:
        outs = []
        with scheduler._wake:  # the scheduler admits none before all are in line
            for prompt, n, params, draft in jobs:
                c = Collector()
                scheduler.submit(engine.stream(prompt, n, params, draft=draft), c)
                outs.append(c)
        if during is not None:
            during(outs)
        for c in outs:
            assert c.done.wait(120)
        return outs
    finally:
        scheduler.close()
