"""`moemesh` command line: one entry point, one subcommand per job.

Flags follow llama.cpp / mlx-lm habits (-m, -p, -n, --temp, --top-p, --seed); results go to
stdout, notes and stats to stderr; any expected failure is one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    """The checkpoint folder: -m's folder or Hugging Face repository id (coordinator.hub), else the demo model."""
    if path:
        from .hub import resolve

        return str(resolve(path))
    from .demo import RANDOM_WEIGHTS_NOTICE, demo_model_dir

    print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    return str(demo_model_dir())


MODEL_HELP = "Hugging Face snapshot folder, or a repository id in the local Hugging Face cache " \
             "(openai/gpt-oss-20b); default: the embedded demo model"


def add_model_args(p: argparse.ArgumentParser, default_precision: str = "exact") -> None:
    p.add_argument("-m", "--model", help=MODEL_HELP)
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="kernel threads (default: MOEMESH_THREADS, else every core)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="most tokens a sequence holds, prompt and answer (caps the KV cache's memory; "
                        "default: the model's context)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=default_precision,
                   help="exact: fp32 activations; fast: int16-block activations in the experts; reference: pure numpy")
    p.add_argument("--dense", choices=("bf16", "q8"), default="bf16",
                   help="q8: compute attention and the unembedding on an 8-bit copy made at load (fast "
                        "precision; half the bytes per token outside the experts, a small accuracy cost)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into huge-page memory instead of mapping the files: a slower start, "
                        "a faster decode where mapped pages read slowly (as on some VMs)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", action="store_true", help="compute the experts on expert nodes")
    g.add_argument("--node", action="append", default=[], metavar="HOST:PORT",
                   help="an expert node's address (repeatable); without it nodes are found by mDNS")
    g.add_argument("--expect", type=int, default=None, help="wait until this many nodes are found (at most --timeout seconds); fewer is an error")
    g.add_argument("--timeout", "--discover-timeout", dest="discover_timeout", type=float, default=3.0,
                   help="seconds to wait for nodes on mDNS (the same flag as in discover and cluster up)")
    g.add_argument("--interface", default=None, help="IP address of the interface for mDNS (default: all)")
    g.add_argument("--replicas", type=int, default=1, help="copies of every expert on distinct nodes")
    g.add_argument("--plan", default=None, help="cluster plan saved by `moemesh cluster up` (default: the last one)")
    add_security_args(g)


def add_security_args(p) -> None:
    p.add_argument("--identity-dir", default=None, help="this device's key, certificate and paired peers "
                   "(default: ~/.cache/moemesh/identity)")
    p.add_argument("--insecure", action="store_true", help="plaintext, unauthenticated gRPC: for a lab only")


def trusted(nodes, args):
    """mDNS results whose advertised certificate fingerprint we have paired with (or all, insecure)."""
    if args.insecure:
        return nodes
    from expert_node.identity import Identity, TrustStore

    me, trust = Identity.load_or_create(args.identity_dir), TrustStore(args.identity_dir)
    keep = []
    for n in nodes:
        if trust.trusts(n.properties.get("fp", ""), me):
            keep.append(n)
        else:
            print(f"ignoring unpaired node {n.node_id} at {n.address} (pair with `moemesh pair`)", file=sys.stderr)
    return keep


def int_or_minus_one(meaning: str):
    """An argparse type: a non-negative integer, or -1 with `meaning` (llama.cpp's convention)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -2
        if n < -1:
            raise argparse.ArgumentTypeError(f"expected a non-negative integer, or -1 for {meaning}; got {text!r}")
        return n
    return parse


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int_or_minus_one("until the end of the text"), default=128,
                   help="tokens to generate (-1: until the end of the text or a full context)")
    p.add_argument("--temp", type=float, default=1.0, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("-s", "--seed", type=int_or_minus_one("a random seed"), default=None,
                   help="sampling seed (-1: a random one, printed)")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    from .drafting import DEFAULT_DRAFT, DraftParams

    g = p.add_argument_group("speculative decoding (lossless: the same text, faster when it repeats itself)")
    g.add_argument("--draft", type=draft_tokens, default=DEFAULT_DRAFT, metavar="N",
                   help=f"most draft tokens verified per round, looked up in the prompt and the text so far "
                        f"(0 = off, at most {DraftParams.MAX_DRAFT}; default {DEFAULT_DRAFT})")
    g.add_argument("--draft-ngram", type=ngram_sizes, default=(DraftParams.ngram_min, DraftParams.ngram_max),
                   metavar="MIN:MAX", help="n-gram sizes a draft's lookup matches, longest first (default "
                                           f"{DraftParams.ngram_min}:{DraftParams.ngram_max})")


def draft_tokens(text: str) -> int:
    from .drafting import DraftParams

    try:
        return DraftParams(int(text)).max_tokens
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "draft" in str(e) else f"expected a number, got {text!r}") from None


def ngram_sizes(text: str) -> tuple[int, int]:
    from .drafting import DraftParams

    try:
        sizes = DraftParams.parse_ngram(text)
        DraftParams(0, *sizes)
        return sizes
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def draft_params(args):
    from .drafting import DraftParams

    return DraftParams(args.draft, *args.draft_ngram)


def sampling_params(args):
    """SamplingParams from the flags; --seed -1 draws a seed and says which (to reproduce the run)."""
    import secrets

    from .sampling import SamplingParams

    seed = args.seed
    if seed == -1:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}", file=sys.stderr)
    return SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, seed)


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


def plan_path_of(args) -> Path:
    from . import cluster

    return Path(args.plan) if getattr(args, "plan", None) else cluster.default_plan_path()


def find_nodes(args, timeout: float, creds) -> list[str]:
    """Addresses of the paired nodes advertising on mDNS (every address of every advert: the
    handshake decides which are real), saying first what it waits for."""
    from . import cluster, discovery

    want = f"{args.expect} expert nodes" if args.expect else "expert nodes"
    print(f"looking for {want} on mDNS for up to {timeout:g} s (start `moemesh node serve` on a device, "
          f"or pass --node HOST:PORT)...", file=sys.stderr, flush=True)
    def verify(address: str) -> str | None:
        client = cluster.NodeClient(address, creds)
        try:
            return client.handshake(timeout=2.0).node_id
        except cluster.ClusterError as e:
            print(f"skipping {e}", file=sys.stderr)
            return None
        finally:
            client.close()

    found = trusted(discovery.browse(timeout, args.expect, args.interface, verify=verify), args)
    n_ids = len({a.node_id for a in found})
    if args.expect and n_ids < args.expect:
        raise cluster.ClusterError(f"found {n_ids} paired expert nodes on mDNS within {timeout:g} s, "
                                   f"expected {args.expect}")
    return [a.address for a in found]


def connect_cluster(args, folder: str):
    """Experts on the cluster: the --node list, else the plan saved by `moemesh cluster up` for this
    model, else the nodes found on mDNS. A saved plan that no longer matches the nodes (one
    restarted with a new id, one that does not answer) is repaired and saved again."""
    from . import cluster, discovery
    from expert_node.checkpoint import Checkpoint

    creds = cluster.credentials(args.insecure, args.identity_dir)
    plan_path, plan = plan_path_of(args), None
    if args.node:
        addresses = [a.address for a in discovery.parse_static(args.node)]
    else:
        plan = cluster.load_plan(plan_path)
        if plan and plan["model"] == str(Path(folder).resolve()):
            addresses = list(plan["nodes"].values())
        else:
            plan, addresses = None, find_nodes(args, args.discover_timeout, creds)
    experts, reports = cluster.connect(Checkpoint(folder), args.precision, addresses, args.replicas,
                                       plan["placement"] if plan else None, creds=creds,
                                       plan_nodes=plan["nodes"] if plan else None)
    if plan and (experts.placement != plan["placement"] or {r.node_id: r.address for r in reports} != plan["nodes"]):
        cluster.save_plan(plan_path, folder, reports, experts.placement)
        print(f"the saved cluster plan did not match the nodes that answered: repaired and saved to {plan_path}",
              file=sys.stderr)
    return experts, reports


def load_engine(args):
    from .engine import Engine

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        from expert_node import native

        native.set_threads(args.threads)
    folder = resolve_model(args.model)
    experts = None
    if getattr(args, "cluster", False):
        experts, reports = connect_cluster(args, folder)
        for r in reports:
            print(f"node {r.info.name} ({r.address}): {r.pieces} experts, {r.bytes_pushed / 1e6:.1f} MB pushed",
                  file=sys.stderr)
    engine = Engine.load(folder, precision=args.precision, experts=experts, dense=args.dense, mmap=not args.no_mmap)
    if args.ctx_size is not None:
        engine.limit_context(args.ctx_size)
    return engine


def topology_table(rows: list[dict]) -> str:
    head = f"{'node':<14}{'address':<22}{'isa':<8}{'cores':>5}{'weights':>10}{'budget':>9}{'layers':>7}{'experts':>8}" \
           f"{'pushed':>9}{'rtt':>8}"
    lines = [head]
    for r in rows:
        if not r.get("up", True):
            lines.append(f"{'?':<14}{r['address']:<22}DOWN  {r['error']}")
            continue
        n_exp = sum(len(v) for v in r["layers"].values())
        lines.append(f"{r['name'][:13]:<14}{r['address']:<22}{r['isa']:<8}{r['cores']:>5}"
                     f"{r['weight_bytes'] / 1e6:>8.1f}MB{r['memory_budget'] / 1e9:>7.1f}GB{len(r['layers']):>7}"
                     f"{n_exp:>8}{r.get('pushed_mb', 0):>7.1f}MB{r['rtt_ms']:>6.2f}ms")
    return "\n".join(lines)


def cmd_cluster_up(args) -> int:
    from . import cluster, discovery
    from .engine import Engine
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


def cmd_cluster_status(args) -> int:
    import time as _time

    from . import cluster

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


def cmd_cluster_down(args) -> int:
    from . import cluster
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


def cmd_logits(args) -> int:
    engine = load_engine(args)
    np.save(args.out, engine.logits(args.tokens).astype(np.float32))
    return 0


def cmd_generate(args) -> int:
    from .harmony import STOP_IDS
    from .tokenizer import Tokenizer

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


def model_name(given: str | None, folder: Path) -> str:
    """What /v1/models calls the model: the repository id it was named by, else its folder's name."""
    return given if given and not Path(given).expanduser().is_dir() else folder.name


def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from .server import ServeConfig, Service, create_app
    from .tokenizer import Tokenizer

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


def cmd_chat(args) -> int:
    from . import chat
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
        params=sampling_params(args), draft=draft_params(args),
        max_tokens=args.max_tokens, show_reasoning=args.show_reasoning)
    return chat.run_repl(chat.ChatSession(engine, tok, options))


def cmd_profile(args) -> int:
    from . import profile
    from .tokenizer import Tokenizer

    if args.plot:
        profile.require_matplotlib()
    engine = load_engine(args)
    engine.warm()
    prompt_ids = Tokenizer.from_dir(engine.checkpoint.folder).encode(args.prompt)
    result = profile.run_profile(engine, prompt_ids, args.max_tokens, draft=draft_params(args))
    if args.trace:
        result["tracer"].write(args.trace)
    if args.plot:
        profile.plot(result, args.plot)
    print(profile.to_json(result) if args.json else profile.render(result))
    return 0


def cmd_pair(args) -> int:
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.prompt, args.max_tokens, args.nodes)


def cmd_node_serve(args) -> int:
    from expert_node.lifecycle import run_node

    run_node(args.port, args.name, args.cache_dir, args.max_memory, args.model, args.host, args.identity_dir,
             args.insecure, advertise=not args.no_mdns, advertise_port=args.advertise_port, interface=args.interface)
    return 0


def cmd_discover(args) -> int:
    from . import discovery

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


def tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535 (0: any free port), got {text!r}")
    return port


def parse_bytes(text: str) -> int:
    """6G, 6GB (10^9), 6GiB, 6Gi (2^30), 512M, or plain bytes."""
    t = text.strip().lower()
    binary = t.endswith(("ib", "i"))
    t = t.removesuffix("b").removesuffix("i")
    scale = {"k": 1, "m": 2, "g": 3, "t": 4}
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * (1024 if binary else 1000) ** scale[t[-1]])
        if binary:
            raise ValueError
        return int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected a size like 6G, 6GiB or 512M, got {text!r}") from None


class HelpFormatter(argparse.HelpFormatter):
    """Every help page shows each option's default (argparse's ArgumentDefaultsHelpFormatter, but
    silent where there is none to show or the text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS, []) and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def subcommands(parser: argparse.ArgumentParser, dest: str):
    """add_subparsers whose pages use HelpFormatter too."""
    return parser.add_subparsers(dest=dest, required=True,
                                 parser_class=lambda **kw: argparse.ArgumentParser(formatter_class=HelpFormatter, **kw))


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="moemesh", description="Mixture-of-Experts LLMs across your devices",
                                     formatter_class=HelpFormatter)
    try:
        parser.add_argument("--version", action="version", version=f"moemesh {version('moemesh')}")
    except PackageNotFoundError:  # running from a source tree that was never installed
        parser.add_argument("--version", action="version", version="moemesh (not installed)")
    sub = subcommands(parser, "command")

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
    add_cluster_args(p)
    p.add_argument("--tokens", type=parse_ids, required=True, help="comma-separated token ids")
    p.add_argument("--out", required=True, help="output .npy file")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (harmony format) in the terminal")
    add_model_args(p, default_precision="fast")
    add_cluster_args(p)
    add_sampling_args(p)
    add_draft_args(p)
    p.set_defaults(max_tokens=2048)
    p.add_argument("--system", help="developer instructions for the assistant")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--show-reasoning", action="store_true", help="show the analysis channel (dimmed)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("profile", help="latency of every stage and hop of a token, per device")
    add_model_args(p, default_precision="fast")
    add_cluster_args(p)
    p.add_argument("-p", "--prompt", default="Explain how a mixture-of-experts model routes tokens.")
    p.add_argument("-n", "--max-tokens", type=int, default=16, help="decode steps to profile")
    p.add_argument("--trace", help="write Chrome trace JSON (open in Perfetto or chrome://tracing)")
    p.add_argument("--plot", help="write a per-layer PNG of one token (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_draft_args(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("serve", help="an OpenAI-compatible API server and a chat page, for every device in the house")
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
    p.set_defaults(func=cmd_serve)

    node = subcommands(sub.add_parser("node", help="run an expert node"), "node_command")
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
    p.set_defaults(func=cmd_node_serve)

    cl = sub.add_parser("cluster", help="bring a cluster of expert nodes up, inspect it, release it")
    cls = subcommands(cl, "cluster_command")
    p = cls.add_parser("up", help="discover nodes, place and push the experts, save the plan")
    p.add_argument("-m", "--model", help="Hugging Face snapshot folder (default: the embedded demo model)")
    p.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="static node list (repeatable)")
    p.add_argument("--expect", type=int, default=None, help="wait until this many nodes are found (at most --timeout seconds); fewer is an error")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for nodes on mDNS")
    p.add_argument("--replicas", type=int, default=1, help="copies of every expert on distinct nodes")
    p.add_argument("--plan", default=None, help="where to save the plan (default: ~/.cache/moemesh/cluster.json)")
    p.add_argument("--interface", default=None, help="IP address of the interface for mDNS (default: all)")
    add_security_args(p)
    p.set_defaults(func=cmd_cluster_up)
    for name, fn, hlp in (("status", cmd_cluster_status, "the live state of every node in the plan"),
                          ("down", cmd_cluster_down, "release the nodes and forget the plan")):
        p = cls.add_parser(name, help=hlp)
        p.add_argument("--plan", default=None, help="the plan file (default: ~/.cache/moemesh/cluster.json)")
        add_security_args(p)
        if name == "status":
            p.add_argument("--json", action="store_true")
            p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
            p.add_argument("--interval", type=float, default=2.0)
        p.set_defaults(func=fn)

    p = sub.add_parser("pair", help="pair this device with another (one listens and shows a code, one types it)")
    p.add_argument("address", nargs="?", help="HOST:PORT of the listening device (omit to listen)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT", help="where to listen (default 0.0.0.0:7079)")
    p.add_argument("--code", default=None, help="the pairing code (default: shown / asked)")
    p.add_argument("--role", choices=("node", "coordinator"), default="node")
    p.add_argument("--name", default=None, help="this device's name (default: host name)")
    p.add_argument("--identity-dir", default=None)
    p.set_defaults(func=cmd_pair)

    p = sub.add_parser("demo", help="two expert nodes on loopback, a cluster, an answer, the per-hop profile")
    p.add_argument("-p", "--prompt", default="The experts of a mixture-of-experts model")
    p.add_argument("-n", "--max-tokens", type=int, default=24)
    p.add_argument("--nodes", type=int, default=2)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("discover", help="list the expert nodes advertising on mDNS")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")
    p.add_argument("--expect", type=int, default=None, help="wait until this many nodes are found (at most --timeout seconds); fewer is an error")
    p.add_argument("--interface", default=None, help="IP address of the interface for mDNS (default: all)")
    p.add_argument("--watch", action="store_true", help="print nodes appearing and leaving until --timeout")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_discover)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth" and not args.dry_run and not args.out:
        print("moemesh synth: -o/--out is required (or --dry-run)", file=sys.stderr)
        return 2
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
