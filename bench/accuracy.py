"""Accuracy of the fast configurations against exact on a full-size checkpoint (issues 3 and 4);
run by hand, not a test (the tests measure the tiny models):

    python bench/accuracy.py -m /path/gpt-oss-20b [--prompts 3] [--tokens 48]

For `fast` and `fast --dense q8`: mean KL divergence of the next-token distributions against
`exact` over every position of a few random prompts, and top-1 agreement. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from coordinator import Engine


def log_softmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    m = a.max(axis=1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    prompts = [np.random.default_rng(s).integers(0, 199_998, args.tokens) for s in range(args.prompts)]
    exact = [log_softmax(l) for l in map(Engine.load(args.model, "exact").logits, prompts)]
    result = {}
    for name, dense in (("fast", "bf16"), ("fast+q8", "q8")):
        engine = Engine.load(args.model, "fast", dense=dense)
        kls, agree = [], []
        for p, la in zip(prompts, exact):
            lb = log_softmax(engine.logits(p))
            kls += list((np.exp(la) * (la - lb)).sum(axis=1))
            agree += list(la.argmax(axis=1) == lb.argmax(axis=1))
        result[name] = {"mean_kl": float(np.mean(kls)), "top1_agreement": float(np.mean(agree))}
        print(f"{name:<8} mean KL {np.mean(kls):.3e} nats, top-1 agreement {np.mean(agree):.1%} "
              f"({len(kls)} positions)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
