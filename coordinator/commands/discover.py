"""`moemesh discover`: the expert nodes advertising on mDNS."""
from __future__ import annotations

import argparse
import json
import sys

NAME, HELP = "discover", "list the expert nodes advertising on mDNS"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")
    p.add_argument("--expect", type=int, default=None, help="wait until this many nodes are found (at most --timeout seconds); fewer is an error")
    p.add_argument("--interface", default=None, help="IP address of the interface for mDNS (default: all)")
    p.add_argument("--watch", action="store_true", help="print nodes appearing and leaving until --timeout")
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    from .. import discovery

    def event(kind, node):
        if args.json:
            print(json.dumps({"event": kind, "node_id": node.node_id, "address": node.address}), flush=True)
        else:
            print(f"{kind:8} {node.node_id}  {node.address}  {node.properties.get('isa', '')}", flush=True)

    nodes = discovery.browse(args.timeout, None if args.watch else args.expect, args.interface,
                             on_event=event if args.watch else None)
    if not args.watch:
        if args.json:
            print(json.dumps([{"node_id": n.node_id, "address": n.address, **n.properties} for n in nodes]))
        else:
            for n in nodes:
                print(f"{n.node_id}  {n.address}  cores={n.properties.get('cores')} isa={n.properties.get('isa')} "
                      f"mem={int(n.properties.get('mem', 0)) / 1e9:.1f}GB")
            print(f"{len(nodes)} expert node(s) found", file=sys.stderr)
        if args.expect and len(nodes) < args.expect:
            print(f"moemesh discover: error: {len(nodes)} of the {args.expect} expected nodes answered within "
                  f"{args.timeout:g} s", file=sys.stderr)
            return 1
    return 0
