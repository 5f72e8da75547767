"""`moemesh generate`: a raw completion, streamed (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (add_cluster_args, add_draft_args, add_model_args, add_sampling_args, draft_params, load_engine,
                     parse_ids, sampling_params)

NAME, HELP = "generate", "complete a raw prompt (no chat template)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_cluster_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (special tokens like <|start|> are honoured; - reads "
                                            "standard input)")
    src.add_argument("-f", "--file", help="read the prompt from this file")
    src.add_argument("--tokens", type=parse_ids, help="prompt as comma-separated token ids")
    add_sampling_args(p)
    add_draft_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def main(args) -> int:
    from ..harmony import STOP_IDS
    from ..tokenizer import Tokenizer

    engine = load_engine(args)
    # Token ids in, token ids out need no tokenizer (`text` is null then).
    has_tokenizer = (engine.checkpoint.folder / "tokenizer.json").exists()
    tok = Tokenizer.from_dir(engine.checkpoint.folder) if has_tokenizer or args.tokens is None else None
    prompt_ids = args.tokens if args.tokens is not None else tok.encode(prompt_text(args))
    if not prompt_ids:
        raise ValueError("the prompt is empty (-p \"\" encodes to no tokens)")
    vocab = engine.config.vocab_size
    if not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"--tokens: token ids must be in [0, {vocab})")
    params = sampling_params(args)
    gen = engine.stream(prompt_ids, args.max_tokens, params, stop_ids=STOP_IDS if args.max_tokens < 0 else (),
                        tokenizer=None if args.json or tok is None else tok, draft=draft_params(args))
    generated = []
    try:
        for step in gen:
            generated.append(step.token)
            if not args.json:
                print(step.text if tok is not None else f"{step.token},", end="", flush=True)
    finally:
        if not args.json:
            print()
        if gen.stats.prompt_seconds:  # no stats line for a run that never started
            print(gen.stats.summary(), file=sys.stderr)
    if args.json:
        print(json.dumps({"prompt_ids": list(prompt_ids), "generated_ids": generated,
                          "text": tok.decode(generated) if tok is not None else None}))
    return 0


def prompt_text(args) -> str:
    """-p TEXT, -p - (standard input) or -f FILE."""
    if args.file is not None:
        return Path(args.file).read_text(encoding="utf-8")
    return sys.stdin.read() if args.prompt == "-" else args.prompt
