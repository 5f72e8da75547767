"""`moemesh convert`: a bf16 checkpoint's experts to 4 or 8 bits, streamed tensor by tensor."""
from __future__ import annotations

import argparse
import json
import sys

NAME, HELP = "convert", "convert a bf16 checkpoint's experts (Qwen3-MoE) to MXFP4, Q4 or Q8, with its accuracy cost"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..convert import DENSE_FORMATS, EXPERT_FORMATS
    from ..shards import DEFAULT_SHARD_BYTES

    p.add_argument("-m", "--model", required=True, help="the source: a Hugging Face snapshot folder (or a repo id "
                   "in the local Hugging Face cache) with bf16 experts")
    p.add_argument("-o", "--out", required=True, help="the new folder to write")
    p.add_argument("--experts", choices=EXPERT_FORMATS, default="q4",
                   help="the experts' format: mxfp4 (4.25 bits a weight: FP4 values, a power-of-two scale per 32), "
                        "q4 (4.5 bits: int4 with an fp16 scale per 32, as llama.cpp's Q4_0; closer to a bf16-trained "
                        "model) or q8 (8.5 bits: int8 per 32, as Q8_0)")
    p.add_argument("--dense", choices=DENSE_FORMATS, default="bf16",
                   help="the attention projections and the unembedding: copied as bf16 (an 8-bit copy can still be "
                        "made at load: --dense q8 on chat, serve, generate), or stored as q8 (int8 per 32 with an fp16 "
                        "scale, as llama.cpp's Q8_0: half the bytes, the fast path's default then)")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="largest shard size")
    p.add_argument("--no-eval", action="store_true", help="skip measuring the accuracy cost against the source")
    p.add_argument("--eval-prompts", type=int, default=4, help="prompts of 32 tokens the accuracy is measured on")


def main(args) -> int:
    from ..convert import accuracy, convert
    from ..hub import resolve

    src = resolve(args.model)
    out = convert(src, args.out, args.experts, args.shard_bytes, dense=args.dense)
    print(out)
    if not args.no_eval:
        cost = accuracy(src, out, prompts=args.eval_prompts)
        print(f"accuracy against the source ({cost['positions']} positions): mean KL {cost['mean_kl']:.3e} nats, "
              f"top-1 agreement {cost['top1_agreement']:.1%}", file=sys.stderr)
        print(json.dumps(cost))
    return 0
