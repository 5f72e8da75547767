"""One module per `moemesh` command: NAME and HELP, add_arguments(parser) and main(args) (a command
with subcommands, `node` and `cluster`, gives each its own function in add_arguments). Flags and
what several commands share live in common.py."""
from . import chat, cluster, convert, demo, discover, generate, logits, node, pair, profile, serve, synth

# In the order `moemesh --help` lists them.
COMMANDS = (synth, convert, logits, generate, chat, profile, serve, node, cluster, pair, demo, discover)
