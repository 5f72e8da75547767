"""`moemesh demo`: two nodes on loopback, a cluster, an answer, the per-hop profile."""
from __future__ import annotations

import argparse

NAME, HELP = "demo", "two expert nodes on loopback, a cluster, an answer, the per-hop profile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", default="The experts of a mixture-of-experts model")
    p.add_argument("-n", "--max-tokens", type=int, default=24)
    p.add_argument("--nodes", type=int, default=2)


def main(args) -> int:
    from ..demo import run_demo

    return run_demo(args.prompt, args.max_tokens, args.nodes)
