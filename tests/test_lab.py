"""End to end on separate hosts: a coordinator and two expert nodes in their own network
namespaces on a bridge (deploy/lab/lab.py), found over mDNS across the bridge, brought up with
`moemesh cluster up`, generating exactly what a single device generates."""
import json
import os
import subprocess
import sys

import pytest

from support import MOEMESH, ROOT, TESTS

sys.path.insert(0, str(ROOT / "deploy" / "lab"))
import lab as lablib  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    try:
        with lablib.Lab(2, "lan") as lab:
            yield lab
    except subprocess.CalledProcessError as e:
        if "Operation not permitted" in (e.stderr or ""):
            pytest.skip(f"network namespaces not permitted here: {e.stderr.strip()}")
        raise


def test_cluster_across_hosts_matches_single_device(tiny_dir, lab, tmp_path):
    for i in (1, 2):
        lab.start_node(i, tmp_path / f"node{i}")
    env = dict(os.environ, MOEMESH_CACHE=str(tmp_path / "coord-cache"))
    coord_ip = lab.hosts["coord"]

    def coord(*args):
        proc = lab.run("coord", MOEMESH + list(map(str, args)), env=env, cwd=TESTS)
        assert proc.returncode == 0, proc.stderr
        return proc

    # the coordinator has its own identity: it pairs with the nodes' device identity first
    node_ip = lab.hosts["node1"]
    listener = lab.popen("node1", MOEMESH + ["pair", "--listen", f"{node_ip}:7079", "--code", "424242"],
                         stdout=subprocess.PIPE, text=True, cwd=TESTS)
    assert "pairing code: 424242" in listener.stdout.readline()
    listener.stdout.readline()
    assert "paired with" in coord("pair", f"{node_ip}:7079", "--code", "424242", "--role", "coordinator").stdout
    assert listener.wait(30) == 0
    up = coord("cluster", "up", "-m", tiny_dir, "--expect", 2, "--timeout", 20, "--interface", coord_ip)
    assert "node1" in up.stdout and "node2" in up.stdout and "10.77.0.11:7070" in up.stdout
    status = json.loads(coord("cluster", "status", "--json").stdout)
    assert sorted(n["name"] for n in status["nodes"]) == ["node1", "node2"]
    assert all(n["up"] and sum(len(e) for e in n["layers"].values()) == 16 for n in status["nodes"])
    gen = ["generate", "-m", tiny_dir, "--tokens", "3,1415,92,65", "-n", 10, "--temp", 0.7, "--seed", 9, "--json"]
    clustered = json.loads(coord(*gen, "--cluster").stdout)
    single = json.loads(subprocess.run(MOEMESH + list(map(str, gen)), capture_output=True, text=True, cwd=TESTS,
                                       check=True).stdout)
    assert clustered == single
