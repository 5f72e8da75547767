"""The profiler: a node behind an emulated link of known added delay gets that delay as wire
time (not compute); traces are valid Chrome JSON that nests; single-device runs have no hops."""
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from coordinator import Engine, cluster, profile
from expert_node.checkpoint import Checkpoint
from support import LinkProcess

pytestmark = pytest.mark.timeout(180)
ADDED_RTT_MS = 20.0
PROMPT = list(range(2000, 2012))


def check_nesting(trace: dict) -> None:
    tracks = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and isinstance(e["ts"], (int, float))
            tracks[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for spans in tracks.values():
        stack = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start + 1e-3:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, "overlapping spans on one track"
            stack.append(end)


def test_added_link_delay_is_attributed_to_the_wire(tiny_dir, start_node, tmp_path):
    fast, slow = start_node("--no-mdns", "--host", "127.0.0.1"), start_node("--no-mdns", "--host", "127.0.0.1")
    link = LinkProcess(slow.address, "--rtt-ms", str(ADDED_RTT_MS))
    try:
        experts, _ = cluster.connect(Checkpoint(tiny_dir), "fast", [fast.address, link.address], progress=False)
        engine = Engine.load(tiny_dir, precision="fast", experts=experts)
        result = profile.run_profile(engine, PROMPT, 5)
        rows = {(r["device"], r["kind"]): r for r in result["rows"]}
        slow_label = next(d for d, k in rows if link.address in d and k == "wire")
        fast_label = next(d for d, k in rows if fast.address in d and k == "wire")
        assert rows[(slow_label, "wire")]["p50_ms"] == pytest.approx(ADDED_RTT_MS, rel=0.2)
        assert rows[(fast_label, "wire")]["p50_ms"] < 0.2 * ADDED_RTT_MS
        compute = next(r for (d, k), r in rows.items() if k == "compute" and link.address in d)
        assert compute["p50_ms"] < 0.1 * ADDED_RTT_MS
        assert set(result["critical_path"]["slowest_node_share"]) == {slow_label}
        model = result["model"]  # the latency model's lines: a 3 ms Wi-Fi costs more than loopback
        assert 0 < model["phone_x2_laptop_wifi_tps"] < model["phone_x1_laptop_wifi_tps"]
        assert model["coordinator_ms"] > 0 and model["separate_devices_tps"] > 0
        assert "latency model" in profile.render(result)
        path = tmp_path / "trace.json"
        result["tracer"].write(path)
        trace = json.loads(path.read_text())
        names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
        assert "coordinator" in names and any(link.address in n for n in names) and len(names) == 3
        check_nesting(trace)
        profile.plot(result, tmp_path / "cluster.png")  # each node's network and compute apart
        assert (tmp_path / "cluster.png").read_bytes()[:4] == b"\x89PNG"
        experts.close()
    finally:
        link.stop()


def test_single_device_profile_has_no_network_rows(tiny_dir):
    result = profile.run_profile(Engine.load(tiny_dir, precision="fast"), PROMPT, 4)
    assert {r["device"] for r in result["rows"]} == {"coordinator"}
    assert {r["kind"] for r in result["rows"]} >= {"attention", "router", "experts", "unembed", "sample"}
    # The stages run one after another: what is left of a token is the glue between them.
    assert 0 <= result["between_stages_share"] < 0.5
    check_nesting(result["tracer"].chrome_trace())
    assert json.loads(profile.to_json(result))["tokens"] == 4


def test_plot_writes_a_png(tiny_dir, tmp_path):
    result = profile.run_profile(Engine.load(tiny_dir, precision="fast"), PROMPT, 4, repeats=1)
    profile.plot(result, tmp_path / "token.png")
    assert (tmp_path / "token.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_loading(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from coordinator.cli import main; "
            f"sys.exit(main(['profile', '-m', '{tmp_path / 'absent'}', '--plot', 'x.png']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "pip install 'moemesh[plot]'" in proc.stderr and "Traceback" not in proc.stderr
