"""Coverage-guided fuzzing of the node's boundary with atheris (issue 8); run by hand, not a test:

    pip install atheris && python bench/fuzz.py [--runs 200000]

The hypothesis tests (tests/test_fuzz.py) draw inputs at random; libFuzzer here mutates towards
new branches of the wire decoding and request validation. Each input is one serialized
ExpertRequest: parsed, validated by the node, and when valid computed by the native kernels.
Allowed outcomes: DecodeError, WireError, ValueError, or a finite result of the right shape.
Anything else (another exception, a native crash) stops the run with the input saved by libFuzzer.
Last line: JSON with the number of inputs tried and how they ended.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

try:
    import atheris
except ImportError:
    sys.exit("atheris is not installed: pip install atheris")

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from expert_node import native
    from expert_node.experts import ExpertShape, LayerExperts
    from expert_node.proto import moemesh_pb2 as pb
    from expert_node.protocol import WireError
    from expert_node.server import ExpertNodeService
    from expert_node.store import build_layer

OUTCOMES: Counter = Counter()
RUNS = 0  # libFuzzer exits without running Python's atexit hooks: report after the last input


def make_service() -> ExpertNodeService:
    shape = ExpertShape(n_experts=4, hidden=64, inter=32, swiglu_limit=7.0)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 120, LayerExperts.piece_nbytes(shape), dtype=np.uint8).tobytes() for _ in range(2)]
    svc = ExpertNodeService("fuzz", Path(tempfile.mkdtemp(prefix="moemesh-fuzz-")))
    svc.shape, svc.layers = shape, {0: build_layer(pieces, [1, 3], shape)}
    return svc


SERVICE = make_service()
atheris.instrument_all()  # instrument_imports alone left the corpus without coverage on atheris 3


def one_input(data: bytes) -> None:
    try:
        classify(data)
    finally:
        if sum(OUTCOMES.values()) == RUNS:
            report()


def classify(data: bytes) -> None:
    try:
        request = pb.ExpertRequest.FromString(data)
    except DecodeError:
        OUTCOMES["not protobuf"] += 1
        return
    try:
        hosted, x, local, _ = SERVICE._decode(request)
    except (WireError, ValueError):
        OUTCOMES["refused by validation"] += 1
        return
    out = np.empty(local.shape + (x.shape[1],), np.float32)
    w = hosted.weights
    try:
        native.moe_experts(x, local, w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks,
                           w.down_scales, w.down_bias, out, precision=request.precision)
    except ValueError:
        OUTCOMES["refused by the native boundary"] += 1
        return
    if not np.isfinite(out).all():
        raise AssertionError("non-finite result from a validated request")
    OUTCOMES["computed"] += 1


def seed_corpus(folder: Path) -> None:
    """Valid requests to start from, so mutations reach the compute path."""
    rng = np.random.default_rng(1)
    for i, (tokens, precision) in enumerate([(1, "fast"), (3, "exact"), (2, "fast")]):
        x = rng.standard_normal((tokens, 64)).astype(np.float32)
        ids = rng.choice([1, 3, -1], (tokens, 2)).astype(np.int32)
        req = pb.ExpertRequest(seq=i, layer=0, precision=precision,
                               x=pb.Tensor(dtype="f32", shape=list(x.shape), data=x.tobytes()),
                               expert_ids=pb.Tensor(dtype="i32", shape=list(ids.shape), data=ids.tobytes()))
        (folder / f"seed{i}").write_bytes(req.SerializeToString())


def report() -> None:
    total = sum(OUTCOMES.values())
    for k, v in OUTCOMES.most_common():
        print(f"{k:<32} {v}")
    print(json.dumps({"inputs": total, **OUTCOMES}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200_000)
    args = ap.parse_args()
    global RUNS
    RUNS = args.runs
    corpus = Path(tempfile.mkdtemp(prefix="moemesh-fuzz-corpus-"))
    seed_corpus(corpus)
    atheris.Setup([sys.argv[0], f"-runs={args.runs}", "-max_len=4096", str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
