"""End-to-end single-device benchmark (issue 4); run by hand on a full-size checkpoint:

    moemesh synth --preset gpt-oss-20b -o /path/gpt-oss-20b
    python bench/e2e.py -m /path/gpt-oss-20b [--precision fast|exact] [--dense bf16|q8] [--no-mmap] [--prompt 512] [--decode 128]
                        [--llama-bench /path/llama-bench --gguf /path/gpt-oss-20b.gguf]

Prints prefill tok/s, decode tok/s (greedy, and with chat's default sampling: temperature 1,
top-p 1), time to first token and peak RSS, the CPU model and kernel path, next to the roofline: the
bytes one decoded token must read (dense weights or their 8-bit copies, the unembedding, 4 experts
per layer) divided by the bandwidth yardstick (bench/yardstick.py: the best of reading the weights
as the engine holds them, mapped or with --no-mmap in huge-page memory, with and without
prefetches, and a STREAM triad) measured in the same run, and, given a
llama-bench binary and the same checkpoint converted to GGUF (bench/llamacpp_baseline.py says how),
llama.cpp's prefill and decode measured right after. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource

import numpy as np

from coordinator import Engine
from coordinator.engine import Q8DenseLinear
from coordinator.sampling import SamplingParams
from expert_node import native
from llamacpp_baseline import llama_bench
from yardstick import bandwidth, cpu_model


def bytes_per_decoded_token(engine: Engine) -> int:
    """Weights read per token: every dense array the engine computes with (8-bit copies where
    made) but the embedding table, of which one row, plus k experts per layer."""
    model = engine.model
    expert_ids = {id(a) for a in engine.expert_arrays()}
    dense = sum(a.nbytes for a in engine.weight_arrays() if id(a) not in expert_ids)
    dense += model.embed[0].nbytes - model.embed.nbytes
    k, backend = engine.config.num_experts_per_tok, engine.model.experts  # in-process: layers and shape
    return dense + k * sum(type(w).piece_nbytes(backend.shape) for w in backend.layers.values())


def weights_bandwidth(engine: Engine) -> dict:
    """The yardstick (bench/yardstick.py) on the weights where the engine holds them, mapped or in
    memory: the first ~1.2 GB of expert weights, which every configuration reads."""
    chunks, total = [], 0
    for a in engine.expert_arrays():
        if total > 1.2e9:
            break
        chunks.append(a.reshape(-1).view(np.uint8))
        total += a.nbytes
    return bandwidth(chunks)


def huge_page_share() -> str:
    """How much of this process's anonymous memory the kernel backs with huge pages: --no-mmap
    asks for them, but a fragmented machine may grant few (decode then reads 4 KiB pages)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line and "kB" in line)}
    except OSError:
        return "unknown"
    return f"{kb.get('AnonHugePages', 0) / 1e6:.2f} of {kb.get('Anonymous', 0) / 1e6:.2f} GB anonymous"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--precision", default="fast", choices=("fast", "exact"))
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=128, help="decoded tokens")
    ap.add_argument("--dense", default="bf16", choices=("bf16", "q8"), help="q8: 8-bit copy of the dense matrices")
    ap.add_argument("--no-mmap", action="store_true", help="read the weights into huge-page memory")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: measure it too, on --gguf")
    ap.add_argument("--gguf", help="the same checkpoint converted to GGUF, for --llama-bench")
    args = ap.parse_args()
    if bool(args.llama_bench) != bool(args.gguf):
        ap.error("--llama-bench and --gguf go together")

    engine = Engine.load(args.model, precision=args.precision, dense=args.dense, mmap=not args.no_mmap)
    # what the dense matrices are read as: a checkpoint `convert --dense q8` wrote is q8 without the flag
    dense = "q8" if isinstance(engine.model.linear, Q8DenseLinear) else "bf16"
    engine.warm()
    yard = weights_bandwidth(engine)
    bw = yard["gbps"]
    per_token = bytes_per_decoded_token(engine)
    roofline = bw * 1e9 / per_token
    prompt = np.random.default_rng(0).integers(0, min(engine.config.vocab_size, 150_000), args.prompt)
    gen = engine.stream(prompt, args.decode, SamplingParams(temperature=0))
    for _ in gen:
        pass
    s = gen.stats
    sampled = engine.stream(prompt, args.decode, SamplingParams(temperature=1.0, seed=0))  # chat's default
    for _ in sampled:
        pass
    sampled_tps = sampled.stats.decode_tps
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    ckpt_gb = sum(f.stat().st_size for f in engine.checkpoint.folder.glob("*.safetensors")) / 1e9
    machine = f"{cpu_model()} ({platform.machine()}) isa={native.kernel_path()} threads={native.get_threads()}"
    held = "read into huge-page memory" if args.no_mmap else "mapped"
    print(f"machine: {machine}   model: {args.model}   precision: {args.precision}   dense: {dense}   "
          f"weights: {held}")
    if args.no_mmap:
        print(f"huge pages granted: {huge_page_share()}")
    print(f"bandwidth yardstick: {bw:.1f} GB/s, the best of reading the weights ({held}) "
          f"{yard['read_gbps']:.1f}, with prefetches {yard['prefetch_read_gbps']:.1f}, STREAM triad "
          f"{yard['triad_gbps']:.1f}; bytes per decoded token: {per_token / 1e9:.3f} GB")
    print(f"prefill: {s.prompt_tokens} tokens in {s.prompt_seconds:.2f} s = {s.prefill_tps:.2f} tok/s")
    print(f"decode:  {s.generated_tokens} tokens, {s.decode_tps:.2f} tok/s "
          f"(roofline {roofline:.2f} tok/s, ratio {s.decode_tps / roofline:.2f}); with chat's default "
          f"sampling {sampled_tps:.2f} tok/s ({sampled_tps / s.decode_tps:.2f}x greedy)")
    print(f"time to first token: {s.time_to_first_token:.2f} s; peak RSS {peak_rss_gb:.2f} GB "
          f"(checkpoint {ckpt_gb:.2f} GB)")
    result = {
        "machine": machine, "precision": args.precision, "dense": dense, "mmap": not args.no_mmap,
        "prompt_tokens": s.prompt_tokens,
        "decode_tps": s.decode_tps, "decode_tps_sampled": sampled_tps, "prefill_tps": s.prefill_tps,
        "ttft_s": s.time_to_first_token,
        "roofline_decode_tps": roofline, "decode_ratio_to_roofline": s.decode_tps / roofline,
        "bandwidth_gbps": bw, "bandwidth_readings": yard, "bytes_per_token": per_token, "peak_rss_gb": peak_rss_gb, "checkpoint_gb": ckpt_gb,
    }
    if args.llama_bench:
        del engine, gen, sampled  # llama.cpp's mapping and repacked experts need the memory
        gc.collect()
        native.park_workers()
        llama = llama_bench(args.llama_bench, args.gguf, args.prompt, args.decode, native.get_threads())
        print(f"llama.cpp {llama['build']}, same run: prefill {llama['prefill_tps']:.2f} tok/s, "
              f"decode {llama['decode_tps']:.2f} tok/s (after the {args.prompt}-token prompt, as ours)")
        print(f"moemesh / llama.cpp: prefill {s.prefill_tps / llama['prefill_tps']:.2f}x, "
              f"decode {s.decode_tps / llama['decode_tps']:.2f}x")
        result.update(llamacpp_prefill_tps=llama["prefill_tps"], llamacpp_decode_tps=llama["decode_tps"],
                      prefill_ratio_to_llamacpp=s.prefill_tps / llama["prefill_tps"],
                      decode_ratio_to_llamacpp=s.decode_tps / llama["decode_tps"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
