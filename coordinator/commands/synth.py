"""`moemesh synth`: a random checkpoint in the exact Hugging Face layout."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

NAME, HELP = "synth", "write a random gpt-oss or Qwen3-MoE checkpoint in the Hugging Face layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..shards import DEFAULT_SHARD_BYTES
    from ..synth import PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--config", help="JSON file of config.json keys overriding the preset")
    p.add_argument("-o", "--out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="largest shard size")
    p.add_argument("--experts", choices=("bf16", "mxfp4", "q4", "q8"),
                   help="Qwen3-MoE presets: the experts as the hub ships them (bf16) or as `moemesh convert` writes "
                        "them (mxfp4, q4, q8) (default: bf16 when it fits the disk, else mxfp4)")
    p.add_argument("--dry-run", action="store_true", help="print the tensor plan's totals, write nothing")


def main(args) -> int:
    from .. import synth
    from ..shards import shard_names, shard_plan

    if not args.dry_run and not args.out:
        print("moemesh synth: -o/--out is required (or --dry-run)", file=sys.stderr)
        return 2
    overrides = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            overrides = json.load(f)
    cfg = synth.make_config(args.preset, overrides)
    if cfg.get("model_type") != "qwen3_moe":
        if args.experts is not None:
            print("moemesh synth: --experts applies to Qwen3-MoE presets (gpt-oss's experts are MXFP4)",
                  file=sys.stderr)
            return 2
    elif args.experts != "bf16":
        needed = sum(t.nbytes for t in synth.tensor_plan(cfg))
        free = shutil.disk_usage(next(p for p in Path(args.out or ".").resolve().parents if p.exists())).free
        if args.experts is not None or needed > 0.95 * free:
            if args.experts is None:
                print(f"moemesh synth: bf16 experts need {needed / 1e9:.1f} GB, the disk has {free / 1e9:.1f} GB "
                      "free: writing MXFP4 experts (as `moemesh convert` would)", file=sys.stderr)
            cfg = synth.with_quantized_experts(cfg, args.experts or "mxfp4")
    if args.dry_run:
        plan = synth.tensor_plan(cfg)
        shards = shard_plan(plan, args.shard_bytes)
        print(json.dumps({"tensors": len(plan), "total_bytes": sum(t.nbytes for t in plan),
                          "shards": shard_names(len(shards), cfg.get("model_type", "gpt_oss"))}))
        return 0
    out = synth.write_checkpoint(args.out, cfg, seed=args.seed, max_shard_bytes=args.shard_bytes)
    print(out)
    return 0
