"""The embedded demo model (a tiny synthetic gpt-oss generated on first use and cached) and
`moemesh demo`, the whole idea in one command: two expert nodes on loopback, the cluster brought
up, an answer generated, the topology and the per-hop latency summary printed.

The demo model's weights are RANDOM: it runs the real code paths and tokenizer but writes gibberish.
"""
from __future__ import annotations

import sys
from pathlib import Path

from expert_node.paths import cache_root

from . import synth
from .local_node import LocalNode

DEMO_PRESET, DEMO_SEED = "tiny", 0
RANDOM_WEIGHTS_NOTICE = "note: using the embedded demo model (tiny gpt-oss, RANDOM weights: expect gibberish)"


def demo_model_dir() -> Path:
    folder = cache_root() / "models" / f"{DEMO_PRESET}-seed{DEMO_SEED}"
    if not (folder / "config.json").exists():
        print(f"generating the demo model in {folder} ...", file=sys.stderr)
        synth.write_checkpoint(folder.with_suffix(".partial"), synth.make_config(DEMO_PRESET), seed=DEMO_SEED)
        folder.with_suffix(".partial").replace(folder)
    return folder


def run_demo(prompt: str, max_tokens: int, n_nodes: int = 2, out=sys.stdout) -> int:
    from expert_node.checkpoint import Checkpoint

    from . import cluster, profile
    from .commands.common import topology_table
    from .engine import Engine
    from .tokenizer import Tokenizer

    print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    folder = demo_model_dir()
    nodes = []
    try:
        for i in range(n_nodes):
            # on 127.0.0.1 without mDNS: the demo never touches the real network
            nodes.append(LocalNode(cache_root() / "demo-nodes" / f"node{i + 1}", "--host", "127.0.0.1", "--no-mdns",
                                   "--name", f"demo-node{i + 1}"))
        print(f"started {n_nodes} expert nodes on loopback: {', '.join(n.address for n in nodes)}", file=sys.stderr)
        experts, reports = cluster.connect(Checkpoint(folder), "fast", [n.address for n in nodes])
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
        for node in nodes:
            node.stop()
    return 0
