"""Decode speed across emulated links and cluster sizes (issue 6); run by hand as root:

    sudo .venv/bin/python bench/lab.py [-m DIR] [--tokens 16] [--presets lan,wifi,bad-wifi] [--nodes 1,2,3]

For every (nodes, preset) the lab (deploy/lab/lab.py) puts a coordinator and N expert nodes in
their own network namespaces, every node behind the link emulator; the coordinator runs
`moemesh profile --cluster` and reports decode tok/s, time to first token and the network's
share of a token. Single-device decode on the same model is measured first. Uses gpt-oss-20b
shapes with 4 full-size layers (see bench/cluster.py). Last line: JSON with `decode_tps` per
"nodes/preset". Pushes happen under the first preset (nodes keep their caches).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from cluster import default_model  # noqa: E402  (bench/cluster.py)

# deploy/lab/lab.py, loaded by path: this file is also called lab.py
_spec = importlib.util.spec_from_file_location("moemesh_lab", ROOT / "deploy" / "lab" / "lab.py")
lablib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lablib)

MOEMESH = [sys.executable, "-m", "coordinator.cli"]


def profile(cmd_prefix: list[str], folder: Path, tokens: int, extra: list[str], env: dict) -> dict:
    out = subprocess.run(cmd_prefix + MOEMESH + ["profile", "-m", str(folder), "-n", str(tokens), "--json", *extra],
                         capture_output=True, text=True, env=env, cwd="/", timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--presets", default="lan,wifi,bad-wifi")
    ap.add_argument("--nodes", default="1,2,3")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the lab needs root")
    folder = Path(args.model) if args.model else default_model()
    work = Path(tempfile.mkdtemp(prefix="moemesh-lab-bench-"))
    env = dict(os.environ)  # coordinator and nodes share this machine's identity: no pairing needed
    single = profile([], folder, args.tokens, [], env)
    results = {"single": {"decode_tps": single["decode_tps_untraced"], "ttft_s": single["ttft_s"]}}
    print(f"single device: {single['decode_tps_untraced']:.2f} tok/s, first token {single['ttft_s']:.2f} s", flush=True)
    for n in map(int, args.nodes.split(",")):
        for preset in args.presets.split(","):
            with lablib.Lab(n, preset) as lab:
                addrs = [lab.start_node(i, work / f"node{i}") for i in range(1, n + 1)]
                nodes = [a for addr in addrs for a in ("--node", addr)]
                r = profile(["ip", "netns", "exec", lab.ns("coord")], folder, args.tokens, ["--cluster", *nodes], env)
            share = r["critical_path"].get("network_share", 0.0)
            results[f"{n}/{preset}"] = {"decode_tps": r["decode_tps_untraced"], "ttft_s": r["ttft_s"],
                                        "network_share": share}
            print(f"{n} node(s), {preset:<9}: {r['decode_tps_untraced']:.2f} tok/s, first token {r['ttft_s']:.2f} s, "
                  f"network {share:.0%} of a token", flush=True)
    print(json.dumps({"model": str(folder), "decode_tps": {k: v["decode_tps"] for k, v in results.items()},
                      "details": results}))


if __name__ == "__main__":
    main()
