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


def test_sigterm_tears_the_lab_down():
    """lab.py once exited on SIGTERM leaving its nodes, link proxies and namespaces behind."""
    import re
    import signal

    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "lab" / "lab.py"), "up", "--nodes", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    tag = re.search(r"mmlab-(\w+)-coord", lines[1])
    assert tag, lines + [proc.stderr.read()]
    mine = f"mmlab-{tag.group(1)}-"
    namespaces = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                  if n.startswith(mine)]
    assert len(namespaces) == 3  # switch, coord, node1
    pids = [p for ns in namespaces for p in
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    assert len(pids) == 2  # the node and its link emulator
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "lab removed" in out
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert mine not in left
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)


def test_lab_without_moemesh_is_one_clear_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc = subprocess.run([str(bare / "bin" / "python"), str(ROOT / "deploy" / "lab" / "lab.py"), "up"],
                          capture_output=True, text=True, timeout=60, env={"PATH": str(bare / "bin") + ":/usr/bin:/bin"})
    assert proc.returncode == 1 and "moemesh is not installed for" in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_starts_checks_and_stops_only_its_own_node(tmp_path):
    """launch_nodes.py ran `pkill -f 'moemesh node serve'` (which also killed a systemd-managed
    node on the host) and said ok without checking the node started. Its shell runs here through
    bash instead of ssh, exactly as the host would run it."""
    sys.path.insert(0, str(ROOT / "deploy"))
    import launch_nodes

    env = dict(os.environ, HOME=str(tmp_path))
    command = " ".join(MOEMESH)
    other = subprocess.Popen(MOEMESH + ["node", "serve", "--no-mdns", "--host", "127.0.0.1", "--port", "0",
                                        "--cache-dir", str(tmp_path / "other")], stdout=subprocess.PIPE, text=True,
                             cwd=TESTS)
    try:
        assert "listening" in other.stdout.readline()
        node = {"name": "n1", "host": "localhost", "command": command, "port": 0,
                "args": ["--no-mdns", "--host", "127.0.0.1", "--cache-dir", str(tmp_path / "n1")]}
        up = subprocess.run(["bash", "-c", launch_nodes.up_command(node)], capture_output=True, text=True, env=env,
                            timeout=60, cwd=TESTS)
        assert up.returncode == 0 and "listening on port" in up.stdout, up.stdout + up.stderr
        pid = int((tmp_path / ".moemesh" / "node-n1.pid").read_text())
        down = subprocess.run(["bash", "-c", launch_nodes.down_command(node)], capture_output=True, text=True,
                              env=env, timeout=60)
        assert down.returncode == 0
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert other.poll() is None, "the launcher stopped a node it did not start"
        broken = dict(node, command="false &&")
        failed = subprocess.run(["bash", "-c", launch_nodes.up_command(broken)], capture_output=True, text=True,
                                env=env, timeout=60)
        assert failed.returncode == 1 and "the node exited" in failed.stdout
    finally:
        other.kill()
        other.wait()
        other.stdout.close()
