"""What the commands share: model, cluster, sampling and draft flags and their parsing, loading
the engine (on this device or a cluster), the topology table, and the help pages' formatter."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        from ..hub import resolve

        return str(resolve(path))
    from ..demo import RANDOM_WEIGHTS_NOTICE, demo_model_dir

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
    from ..drafting import DEFAULT_DRAFT, DraftParams

    g = p.add_argument_group("speculative decoding (lossless: the same text, faster when it repeats itself)")
    g.add_argument("--draft", type=draft_tokens, default=DEFAULT_DRAFT, metavar="N",
                   help=f"most draft tokens verified per round, looked up in the prompt and the text so far "
                        f"(0 = off, at most {DraftParams.MAX_DRAFT}; default {DEFAULT_DRAFT})")
    g.add_argument("--draft-ngram", type=ngram_sizes, default=(DraftParams.ngram_min, DraftParams.ngram_max),
                   metavar="MIN:MAX", help="n-gram sizes a draft's lookup matches, longest first (default "
                                           f"{DraftParams.ngram_min}:{DraftParams.ngram_max})")


def draft_tokens(text: str) -> int:
    from ..drafting import DraftParams

    try:
        return DraftParams(int(text)).max_tokens
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "draft" in str(e) else f"expected a number, got {text!r}") from None


def ngram_sizes(text: str) -> tuple[int, int]:
    from ..drafting import DraftParams

    try:
        sizes = DraftParams.parse_ngram(text)
        DraftParams(0, *sizes)
        return sizes
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def draft_params(args):
    from ..drafting import DraftParams

    return DraftParams(args.draft, *args.draft_ngram)


def sampling_params(args):
    """SamplingParams from the flags; --seed -1 draws a seed and says which (to reproduce the run)."""
    import secrets

    from ..sampling import SamplingParams

    seed = args.seed
    if seed == -1:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}", file=sys.stderr)
    return SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, seed)


def plan_path_of(args) -> Path:
    from .. import cluster

    return Path(args.plan) if getattr(args, "plan", None) else cluster.default_plan_path()


def find_nodes(args, timeout: float, creds) -> list[str]:
    """Addresses of the paired nodes advertising on mDNS (every address of every advert: the
    handshake decides which are real), saying first what it waits for."""
    from .. import cluster, discovery

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
    from .. import cluster, discovery
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
    from ..engine import Engine

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
    if args.precision != "reference" and bf16_experts(engine):
        print(f"moemesh: this checkpoint's experts are bf16 (as the hub ships them), the slow path; "
              f"`moemesh convert -m {args.model or folder} -o NEW_FOLDER` makes them MXFP4 once", file=sys.stderr)
    return engine


def bf16_experts(engine) -> bool:
    from ..models import family_of

    return family_of(engine.checkpoint).expert_shape(engine.checkpoint.config).format == "bf16"


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
