"""`moemesh` command line: one entry point, one subcommand per job.

Flags follow llama.cpp / mlx-lm habits (-m, -p, -n, --temp, --top-p, --seed); results go to
stdout, notes and stats to stderr; any expected failure is one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from expert_node.checkpoint import CheckpointError

PRECISION_CHOICES = ("exact", "fast", "reference")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def resolve_model(path: str | None) -> str:
    if path:
        return path
    from .demo import RANDOM_WEIGHTS_NOTICE, demo_model_dir

    print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    return str(demo_model_dir())


def add_model_args(p: argparse.ArgumentParser, default_precision: str = "exact") -> None:
    p.add_argument("-m", "--model", help="Hugging Face snapshot folder (default: the embedded demo model)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=default_precision,
                   help="exact: fp32 activations; fast: int8 activations in the experts; reference: pure numpy")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=1.0, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def cmd_synth(args) -> int:
    from . import synth

    overrides = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            overrides = json.load(f)
    cfg = synth.make_config(args.preset, overrides)
    if args.dry_run:
        plan = synth.tensor_plan(cfg)
        shards = synth.shard_plan(plan, args.shard_bytes)
        print(json.dumps({"tensors": len(plan), "total_bytes": sum(t.nbytes for t in plan),
                          "shards": synth.shard_names(len(shards))}))
        return 0
    out = synth.write_checkpoint(args.out, cfg, seed=args.seed, max_shard_bytes=args.shard_bytes)
    print(out)
    return 0


def load_engine(args):
    from .engine import Engine

    return Engine.load(resolve_model(args.model), precision=args.precision)


def cmd_logits(args) -> int:
    engine = load_engine(args)
    np.save(args.out, engine.logits(args.tokens).astype(np.float32))
    return 0


def cmd_generate(args) -> int:
    from .tokenizer import Tokenizer

    from .sampling import SamplingParams

    engine = load_engine(args)
    tok = Tokenizer.from_dir(engine.checkpoint.folder)
    prompt_ids = args.tokens if args.tokens is not None else tok.encode(args.prompt)
    params = SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, args.seed)
    gen = engine.stream(prompt_ids, args.max_tokens, params, tokenizer=None if args.json else tok)
    generated = []
    try:
        for step in gen:
            generated.append(step.token)
            if not args.json:
                print(step.text, end="", flush=True)
    finally:
        if not args.json:
            print()
        print(gen.stats.summary(), file=sys.stderr)
    if args.json:
        print(json.dumps({"prompt_ids": list(prompt_ids), "generated_ids": generated, "text": tok.decode(generated)}))
    return 0


def cmd_chat(args) -> int:
    from . import chat
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

    for stream in (sys.stdout, sys.stderr):
        if (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="replace")
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        print(f"note: the terminal encoding is {sys.stdout.encoding}, not UTF-8: characters it cannot show "
              "are replaced", file=sys.stderr)
    sys.stdin.reconfigure(errors="replace")
    engine = load_engine(args)
    engine.warm()
    tok = Tokenizer.from_dir(engine.checkpoint.folder)
    options = chat.ChatOptions(
        system=args.system, reasoning_effort=args.reasoning_effort,
        params=SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, args.seed),
        max_tokens=args.max_tokens, show_reasoning=args.show_reasoning)
    return chat.run_repl(chat.ChatSession(engine, tok, options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description="Mixture-of-Experts LLMs across your devices")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a random gpt-oss checkpoint in the Hugging Face layout")
    from .synth import DEFAULT_SHARD_BYTES, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--config", help="JSON file of config.json keys overriding the preset")
    p.add_argument("-o", "--out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="largest shard size")
    p.add_argument("--dry-run", action="store_true", help="print the tensor plan's totals, write nothing")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("logits", help="write float32 [T, vocab] logits of one forward pass to a .npy file")
    add_model_args(p)
    p.add_argument("--tokens", type=parse_ids, required=True, help="comma-separated token ids")
    p.add_argument("--out", required=True, help="output .npy file")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (special tokens like <|start|> are honoured)")
    src.add_argument("--tokens", type=parse_ids, help="prompt as comma-separated token ids")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (harmony format) in the terminal")
    add_model_args(p, default_precision="fast")
    add_sampling_args(p)
    p.set_defaults(max_tokens=2048)
    p.add_argument("--system", help="developer instructions for the assistant")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--show-reasoning", action="store_true", help="show the analysis channel (dimmed)")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth" and not args.dry_run and not args.out:
        print("moemesh synth: -o/--out is required (or --dry-run)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
