"""`moemesh cluster up | status | down`: place and push the experts and save the plan, watch it, release it."""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_security_args, find_nodes, plan_path_of, resolve_model, subcommands, topology_table

NAME, HELP = "cluster", "bring a cluster of expert nodes up, inspect it, release it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    cls = subcommands(p, "cluster_command")
    p = cls.add_parser("up", help="discover nodes, place and push the experts, save the plan")
    p.add_argument("-m", "--model", help="Hugging Face snapshot folder (default: the embedded demo model)")
    p.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="static node list (repeatable)")
    p.add_argument("--expect", type=int, default=None, help="wait until this many nodes are found (at most --timeout seconds); fewer is an error")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for nodes on mDNS")
    p.add_argument("--replicas", type=int, default=1, help="copies of every expert on distinct nodes")
    p.add_argument("--plan", default=None, help="where to save the plan (default: ~/.cache/moemesh/cluster.json)")
    p.add_argument("--interface", default=None, help="IP address of the interface for mDNS (default: all)")
    add_security_args(p)
    p.set_defaults(func=up)
    for name, fn, hlp in (("status", status, "the live state of every node in the plan"),
                          ("down", down, "release the nodes and forget the plan")):
        p = cls.add_parser(name, help=hlp)
        p.add_argument("--plan", default=None, help="the plan file (default: ~/.cache/moemesh/cluster.json)")
        add_security_args(p)
        if name == "status":
            p.add_argument("--json", action="store_true")
            p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
            p.add_argument("--interval", type=float, default=2.0)
        p.set_defaults(func=fn)


def up(args) -> int:
    from .. import cluster, discovery
    from ..engine import Engine
    from expert_node.checkpoint import Checkpoint

    folder = resolve_model(args.model)
    creds = cluster.credentials(args.insecure, args.identity_dir)
    if args.node:
        addresses = [a.address for a in discovery.parse_static(args.node)]
    else:
        addresses = find_nodes(args, args.timeout, creds)
    experts, reports = cluster.connect(Checkpoint(folder), "fast", addresses, args.replicas, creds=creds)
    Engine.load(folder, precision="fast", experts=experts).logits([0])  # warm-up: one token end to end
    plan_path = plan_path_of(args)
    cluster.save_plan(plan_path, folder, reports, experts.placement)
    rows = []
    for r in reports:
        rows.append(dict(cluster.node_status(r.address, creds), pushed_mb=r.bytes_pushed / 1e6, rtt_ms=r.rtt_ms))
    experts.close()
    print(topology_table(rows))
    print(f"plan saved to {plan_path}; `moemesh chat --cluster -m {folder}` uses it", file=sys.stderr)
    return 0


def status(args) -> int:
    import time as _time

    from .. import cluster

    plan_path = plan_path_of(args)
    plan = cluster.load_plan(plan_path)
    if plan is None:
        raise cluster.ClusterError(f"no cluster plan at {plan_path}: run `moemesh cluster up` first")
    creds = cluster.credentials(args.insecure, args.identity_dir)
    while True:
        rows = [cluster.node_status(a, creds) for a in plan["nodes"].values()]
        problems = cluster.plan_problems(plan, rows)
        if args.json:
            print(json.dumps({"model": plan["model"], "nodes": rows, "runs_as_saved": not problems,
                              "problems": problems}), flush=True)
        else:
            verdict = ("the plan runs as saved" if not problems else "the plan cannot run as saved:\n  " +
                       "\n  ".join(problems) + "\nthe next `--cluster` run repairs what it can (the coordinator "
                       "computes the rest), or run `moemesh cluster up` again")
            redraw = args.watch and sys.stdout.isatty()  # in place, as top does; a pipe gets every frame
            print(("\x1b[H\x1b[J" if redraw else "") + f"model {plan['model']}\n" + topology_table(rows) + "\n" +
                  verdict + (f"\n(every {args.interval:g} s; Ctrl-C to stop)" if redraw else ""), flush=True)
        if not args.watch:
            return 0 if not problems else 1
        _time.sleep(args.interval)


def down(args) -> int:
    from .. import cluster
    from expert_node.proto import moemesh_pb2 as pb

    plan_path = plan_path_of(args)
    plan = cluster.load_plan(plan_path)
    if plan is None:
        print(f"no cluster plan at {plan_path}: nothing to release", file=sys.stderr)
        return 0
    creds = cluster.credentials(args.insecure, args.identity_dir)
    for address in plan["nodes"].values():
        client = cluster.NodeClient(address, creds)
        try:
            client.call("release", client.stub.Release, pb.ReleaseRequest(), timeout=5)
            print(f"released {address}", file=sys.stderr)
        except cluster.ClusterError as e:
            print(f"warning: {e}", file=sys.stderr)
        finally:
            client.close()
    plan_path.unlink()
    return 0
