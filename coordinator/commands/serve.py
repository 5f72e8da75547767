"""`moemesh serve`: the OpenAI-compatible server and chat page (coordinator.server)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_cluster_args, add_draft_args, add_model_args, draft_params, load_engine, tcp_port

NAME, HELP = "serve", "an OpenAI-compatible API server and a chat page, for every device in the house"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, default_precision="fast")
    add_cluster_args(p)
    add_draft_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, which "
                                                       "needs --api-key or --no-api-key)")
    p.add_argument("--port", type=tcp_port, default=8080, help="HTTP port (0 = any free port)")
    p.add_argument("-np", "--parallel", type=int, default=4,
                   help="sequences generated at once (they share every forward pass); more requests wait")
    p.add_argument("--api-key", default=None,  # not shown in help: it may be a secret
                   help="clients must send 'Authorization: Bearer KEY' (default: $MOEMESH_API_KEY)")
    p.add_argument("--no-api-key", action="store_true", help="serve other devices without a key")


def model_name(given: str | None, folder: Path) -> str:
    """What /v1/models calls the model: the repository id it was named by, else its folder's name."""
    return given if given and not Path(given).expanduser().is_dir() else folder.name


def main(args) -> int:
    import socket

    import uvicorn

    from ..server import ServeConfig, Service, create_app
    from ..tokenizer import Tokenizer

    if args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
    args.api_key = args.api_key or os.environ.get("MOEMESH_API_KEY")
    local = args.host in ("127.0.0.1", "localhost", "::1")
    if not local and not args.api_key and not args.no_api_key:
        print(f"moemesh serve: --host {args.host} lets other devices in: give --api-key KEY, or --no-api-key to "
              "serve without one", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)  # bound first: a taken port fails before the model loads
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    engine = load_engine(args)
    engine.warm()
    service = Service(engine, Tokenizer.from_dir(engine.checkpoint.folder),
                      ServeConfig(model_name(args.model, engine.checkpoint.folder), args.api_key or None, args.parallel,
                                  draft_params(args)))
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"moemesh serve: http://{host}:{sock.getsockname()[1]}/ (OpenAI API at /v1, chat page at /; "
          f"{args.parallel} sequences at once)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
