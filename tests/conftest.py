"""Shared fixtures: tiny checkpoints written by the project's own generator, once per session."""
from __future__ import annotations

import pytest

from coordinator import synth

# A small shard limit splits tiny-wide across shards + index, the layout of the real 20b snapshot.
SHARDED_BYTES = 20_000_000


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("tiny"), synth.make_config("tiny"), seed=1,
                                  progress=False)


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("tiny-wide"), synth.make_config("tiny-wide"), seed=2,
                                  max_shard_bytes=SHARDED_BYTES, progress=False)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("qwen3-tiny"), synth.make_config("qwen3-tiny"), seed=3,
                                  progress=False)


@pytest.fixture(scope="session")
def qwen3_wide_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("qwen3-tiny-wide"), synth.make_config("qwen3-tiny-wide"),
                                  seed=4, max_shard_bytes=SHARDED_BYTES, progress=False)


# ---- real expert-node processes -------------------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402

from support import NodeProcess  # noqa: E402

@pytest.fixture
def start_node(tmp_path):
    nodes = []

    def start(*args, netns=None, cache_dir=None):
        node = NodeProcess(cache_dir or tmp_path / f"node{len(nodes)}", *args, netns=netns)
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        n.stop(signal.SIGKILL)


@pytest.fixture
def netns():
    """A fresh network namespace whose loopback carries multicast, so mDNS runs on lo inside it
    and no packet can reach a real interface."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    name = f"mmtest-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces not permitted here: {e.stderr.decode().strip()}")
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                    ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, capture_output=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
