"""`moemesh node serve`: an expert node on this device (its life: expert_node.lifecycle)."""
from __future__ import annotations

import argparse

from .common import add_security_args, parse_bytes, subcommands, tcp_port

NAME, HELP = "node", "run an expert node"


def add_arguments(p: argparse.ArgumentParser) -> None:
    node = subcommands(p, "node_command")
    p = node.add_parser("serve", help="host experts for a coordinator (gRPC + mDNS advertisement)")
    p.add_argument("--port", type=tcp_port, default=7070, help="gRPC port (0 = any free port)")
    p.add_argument("--host", default="[::]", help="address to listen on")
    p.add_argument("--name", default=None, help="name shown to coordinators (default: host name)")
    p.add_argument("--cache-dir", default=None, help="where pushed weights are cached")
    p.add_argument("--max-memory", type=parse_bytes, default=None, help="memory offered for experts, e.g. 6G")
    p.add_argument("-m", "--model", default=None, help="this device's own copy of the checkpoint (optional)")
    p.add_argument("--interface", default=None, help="IP address of the interface to advertise on (default: all)")
    p.add_argument("--no-mdns", action="store_true", help="do not advertise (coordinators use --node host:port)")
    p.add_argument("--advertise-port", type=tcp_port, default=None,
                   help="port to advertise when a proxy fronts the node (default: the listening port)")
    add_security_args(p)
    p.set_defaults(func=serve)


def serve(args) -> int:
    from expert_node.lifecycle import run_node

    run_node(args.port, args.name, args.cache_dir, args.max_memory, args.model, args.host, args.identity_dir,
             args.insecure, advertise=not args.no_mdns, advertise_port=args.advertise_port, interface=args.interface)
    return 0
