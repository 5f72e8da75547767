"""`moemesh chat`: the terminal chat (coordinator.chat) on this device or a cluster."""
from __future__ import annotations

import argparse
import sys

from .common import (add_cluster_args, add_draft_args, add_model_args, add_sampling_args, draft_params, load_engine,
                     sampling_params)

NAME, HELP = "chat", "chat with the model in the terminal (its own chat format: harmony, ChatML)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default_precision="fast")
    add_cluster_args(p)
    add_sampling_args(p)
    add_draft_args(p)
    p.set_defaults(max_tokens=2048)
    p.add_argument("--system", help="developer instructions for the assistant")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--show-reasoning", action="store_true", help="show the analysis channel (dimmed)")


def main(args) -> int:
    from .. import chat
    from ..tokenizer import Tokenizer

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
        params=sampling_params(args), draft=draft_params(args),
        max_tokens=args.max_tokens, show_reasoning=args.show_reasoning)
    return chat.run_repl(chat.ChatSession(engine, tok, options))
