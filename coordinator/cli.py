"""`moemesh` command line: one entry point, one subcommand per job (coordinator/commands/).

Flags follow llama.cpp / mlx-lm habits (-m, -p, -n, --temp, --top-p, --seed); results go to
stdout, notes and stats to stderr; any expected failure is one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import sys

from expert_node.checkpoint import CheckpointError

from .commands import COMMANDS
from .commands.common import HelpFormatter, subcommands


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="moemesh", description="Mixture-of-Experts LLMs across your devices",
                                     formatter_class=HelpFormatter)
    try:
        parser.add_argument("--version", action="version", version=f"moemesh {version('moemesh')}")
    except PackageNotFoundError:  # running from a source tree that was never installed
        parser.add_argument("--version", action="version", version="moemesh (not installed)")
    sub = subcommands(parser, "command")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP)
        command.add_arguments(p)
        if hasattr(command, "main"):
            p.set_defaults(func=command.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
