"""`moemesh pair`: pair two devices (one listens and shows a code, one types it)."""
from __future__ import annotations

import argparse

NAME, HELP = "pair", "pair this device with another (one listens and shows a code, one types it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", help="HOST:PORT of the listening device (omit to listen)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="where to listen (default 0.0.0.0:7079)")
    p.add_argument("--code", default=None, help="the pairing code (default: shown / asked)")
    p.add_argument("--role", choices=("node", "coordinator"), default="node")
    p.add_argument("--name", default=None, help="this device's name (default: host name)")
    p.add_argument("--identity-dir", default=None)


def main(args) -> int:
    import socket

    from expert_node.identity import Identity, TrustStore
    from expert_node.pairing import new_code, pair_connect, pair_listen

    name = args.name or socket.gethostname()
    me, trust = Identity.load_or_create(args.identity_dir, name), TrustStore(args.identity_dir)
    if args.address:
        code = args.code or input("pairing code shown on the other device: ").strip()
        peer = pair_connect(me, trust, args.address, code, name, args.role)
    else:
        code = args.code or new_code()
        host, _, port = (args.listen or "0.0.0.0:7079").rpartition(":")

        def ready(bound_port):
            print(f"pairing code: {code}\nwaiting on {host or '0.0.0.0'}:{bound_port}; on the other device run:\n"
                  f"  moemesh pair <this-device-address>:{bound_port}", flush=True)

        def new_code_shown(fresh, why):
            print(f"{why}\nthat code is spent; the new pairing code is: {fresh}", flush=True)

        peer = pair_listen(me, trust, host or "0.0.0.0", int(port), code, name, args.role, ready, new_code_shown)
    print(f"paired with {peer['name']} ({peer['role']}), certificate {peer['fingerprint'][:16]}...")
    return 0
