"""`moemesh logits`: float32 logits of one forward pass, to a .npy file."""
from __future__ import annotations

import argparse

import numpy as np

from .common import add_cluster_args, add_model_args, load_engine, parse_ids

NAME, HELP = "logits", "write float32 [T, vocab] logits of one forward pass to a .npy file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_cluster_args(p)
    p.add_argument("--tokens", type=parse_ids, required=True, help="comma-separated token ids")
    p.add_argument("--out", required=True, help="output .npy file")


def main(args) -> int:
    engine = load_engine(args)
    np.save(args.out, engine.logits(args.tokens).astype(np.float32))
    return 0
