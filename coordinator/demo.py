"""The embedded demo model (a tiny synthetic gpt-oss generated on first use and cached) and
`moemesh demo`, the whole idea in one command: two expert nodes on loopback, the cluster brought
up, an answer generated, the topology and the per-hop latency summary printed.

The demo model's weights are RANDOM: it runs the real code paths and tokenizer but writes gibberish.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import synth
from .tokenizer import cache_dir

DEMO_PRESET, DEMO_SEED = "tiny", 0
RANDOM_WEIGHTS_NOTICE = "note: using the embedded demo model (tiny gpt-oss, RANDOM weights: expect gibberish)"


def demo_model_dir() -> Path:
    folder = cache_dir() / "models" / f"{DEMO_PRESET}-seed{DEMO_SEED}"
    if not (folder / "config.json").exists():
        print(f"generating the demo model in {folder} ...", file=sys.stderr)
        synth.write_checkpoint(folder.with_suffix(".partial"), synth.make_config(DEMO_PRESET), seed=DEMO_SEED)
        folder.with_suffix(".partial").replace(folder)
    return folder


def start_local_node(name: str, cache: Path) -> tuple[subprocess.Popen, str]:
    """An expert node on 127.0.0.1 without mDNS (the demo never touches the real network)."""
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "node", "serve", "--port", "0", "--host",
                             "127.0.0.1", "--no-mdns", "--name", name, "--cache-dir", str(cache)],
                            stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    m = re.search(r"listening on port (\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError(f"expert node {name} did not start")
    return proc, f"127.0.0.1:{m.group(1)}"


def run_demo(prompt: str, max_tokens: int, n_nodes: int = 2, out=sys.stdout) -> int:
    from expert_node.checkpoint import Checkpoint

    from . import cluster, profile
    from .cli import topology_table
    from .engine import Engine
    from .tokenizer import Tokenizer

    print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    folder = demo_model_dir()
    nodes = []
    try:
        for i in range(n_nodes):
            nodes.append(start_local_node(f"demo-node{i + 1}", cache_dir() / "demo-nodes" / f"node{i + 1}"))
        print(f"started {n_nodes} expert nodes on loopback: {', '.join(a for _, a in nodes)}", file=sys.stderr)
        experts, reports = cluster.connect(Checkpoint(folder), "fast", [a for _, a in nodes])
        engine = Engine.load(folder, precision="fast", experts=experts)
        creds = cluster.credentials()
        rows = [dict(cluster.node_status(r.address, creds), pushed_mb=r.bytes_pushed / 1e6, rtt_ms=r.rtt_ms)
                for r in reports]
        print("\n== topology ==", file=out)
        print(topology_table(rows), file=out)
        tok = Tokenizer.from_dir(folder)
        ids = tok.encode(prompt)
        print(f"\n== generating {max_tokens} tokens across the cluster ==\n{prompt}", end="", file=out)
        result = profile.run_profile(engine, ids, max_tokens)
        gen = engine.stream(ids, max_tokens, tokenizer=tok)
        for step in gen:
            print(step.text, end="", flush=True, file=out)
        print(f"\n{gen.stats.summary()}", file=out)
        print("\n== where a token's time goes (per hop) ==", file=out)
        print(profile.render(result), file=out)
        experts.close()
    finally:
        for proc, _ in nodes:
            proc.terminate()
            proc.wait()
            proc.stdout.close()
    return 0
