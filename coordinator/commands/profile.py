"""`moemesh profile`: the latency of every stage and hop of a token (coordinator.profile)."""
from __future__ import annotations

import argparse

from .common import add_cluster_args, add_draft_args, add_model_args, draft_params, load_engine

NAME, HELP = "profile", "latency of every stage and hop of a token, per device"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default_precision="fast")
    add_cluster_args(p)
    p.add_argument("-p", "--prompt", default="Explain how a mixture-of-experts model routes tokens.")
    p.add_argument("-n", "--max-tokens", type=int, default=16, help="decode steps to profile")
    p.add_argument("--trace", help="write Chrome trace JSON (open in Perfetto or chrome://tracing)")
    p.add_argument("--plot", help="write a per-layer PNG of one token (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_draft_args(p)


def main(args) -> int:
    from .. import profile
    from ..tokenizer import Tokenizer

    if args.plot:
        profile.require_matplotlib()
    engine = load_engine(args)
    engine.warm()
    prompt_ids = Tokenizer.from_dir(engine.checkpoint.folder).encode(args.prompt)
    result = profile.run_profile(engine, prompt_ids, args.max_tokens, draft=draft_params(args))
    if args.trace:
        result["tracer"].write(args.trace)
    if args.plot:
        profile.plot(result, args.plot)
    print(profile.to_json(result) if args.json else profile.render(result))
    return 0
