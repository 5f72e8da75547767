"""Kernel benchmark on gpt-oss-20b shapes (issue 3); run by hand, not a test.

Measures this machine's bandwidth in the same run (bench/yardstick.py: the best of a plain read, a
prefetching read and a STREAM triad on huge-page memory),
then for 1 and 2 threads: expert FFN decode (T=1, 4 experts), prefill (T=128 and 512 routed
over 32 experts), q/k/v/o and the unembedding at T=1 — GB/s of weights, GFLOP/s, time, and
ratios to the bandwidth and to numpy. Expert decode is also timed on the same 4 experts every
call (cached in a large last-level cache): cold over cached shows how much memory time the kernel
leaves uncovered by its compute. Weights live in private anonymous memory advised to use
transparent huge pages, as the engine holds them with --no-mmap (its default maps the files'
4 KiB page-cache pages). The last line is one JSON object.

    python bench/kernels.py [--quick] [--llama-ops /path/test-backend-ops]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from coordinator.models.layers import reference_linear
from expert_node import native
from expert_node.checkpoint import huge_page_buffer
from llamacpp_baseline import backend_ops_experts
from yardstick import bandwidth, cpu_model
from expert_node.experts import ExpertShape, LayerExperts, ReferenceExpertBackend

H, I, E, K = 2880, 2880, 32, 4
Q_ROWS, KV_ROWS, VOCAB, LAYERS = 4096, 512, 201088, 24
DECODE_LAYERS = 4


def huge_array(shape, dtype, rng) -> np.ndarray:
    """Random contents in an anonymous mapping advised to use transparent huge pages."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    a = np.frombuffer(huge_page_buffer(n), np.uint8, n)
    step = 1 << 26
    for i in range(0, n, step):
        a[i:i + step] = np.frombuffer(rng.bytes(min(step, n - i)), np.uint8)
    out = a.view(dtype).reshape(shape)
    if dtype == np.uint16:
        # bf16 weights drawn like trained ones (normal, std 0.02): random bit patterns would hold
        # denormals, which cost Intel cores a microcode assist per FMA (5x slower) and no real model has.
        flat = out.reshape(-1)
        for i in range(0, flat.size, step):
            chunk = (rng.standard_normal(min(step, flat.size - i), np.float32) * 0.02).view(np.uint32)
            flat[i:i + step] = (chunk >> 16).astype(np.uint16)
    return out


def timeit(fn, min_time=1.0, min_runs=3) -> float:
    """Median seconds per call."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def make_experts(rng) -> LayerExperts:
    scales = lambda shape: (118 + rng.integers(-1, 2, shape)).astype(np.uint8)  # noqa: E731
    w = LayerExperts(
        huge_array((E, 2 * I, H // 32, 16), np.uint8, rng), scales((E, 2 * I, H // 32)),
        np.zeros((E, 2 * I), np.uint16), huge_array((E, H, I // 32, 16), np.uint8, rng), scales((E, H, I // 32)),
        np.zeros((E, H), np.uint16))
    return w


def expert_bytes_per_expert() -> int:
    return (2 * I * H + H * I) // 2 + (2 * I * H + H * I) // 32  # blocks (4 bit) + scales


def run_experts(w: LayerExperts, x, ids, precision):
    out = np.empty(ids.shape + (H,), np.float32)
    native.moe_experts(x, ids, w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks,
                       w.down_scales, w.down_bias, out, precision=precision)
    return out


def routed_ids(rng, T) -> np.ndarray:
    return np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    ap.add_argument("--llama-ops", help="llama.cpp's test-backend-ops binary: time its gpt-oss-20b expert "
                                        "kernel too (bench/llamacpp_baseline.py)")
    args = ap.parse_args()
    min_time = 0.3 if args.quick else 1.0
    rng = np.random.default_rng(0)
    machine = f"{cpu_model()} ({platform.machine()}) isa={native.kernel_path()}"
    print(f"machine: {machine}, threads available: {native.get_threads()}")

    stream_buf = huge_array((1 << 30,), np.uint8, rng)
    # Decode rotates through 4 layers' experts (1.7 GB), each (layer, expert) coming back only
    # after all the others: random picks from one layer's 423 MB partly hit this VM's 480 MiB L3
    # and read faster than memory can deliver (measured 1.3x).
    decode_layers = [make_experts(rng) for _ in range(DECODE_LAYERS)]
    decode_calls = iter(range(1 << 62))

    def next_decode():
        call = next(decode_calls)
        experts = (np.arange(K, dtype=np.int32) + K * (call // DECODE_LAYERS)) % E
        return decode_layers[call % DECODE_LAYERS], experts[None]
    w, shape = decode_layers[0], ExpertShape(E, H, I, 7.0)
    # all 24 layers' q/k/v/o (1.27 GB), a layer per call: one layer's 53 MB would sit in a big L3
    qkvo_layers = [[huge_array(s, np.uint16, rng) for s in ((Q_ROWS, H), (KV_ROWS, H), (KV_ROWS, H), (H, Q_ROWS))]
                   for _ in range(LAYERS)]
    layer_of_call = iter(range(1 << 62))
    unembed = huge_array((VOCAB, H), np.uint16, rng)
    x1 = rng.standard_normal((1, H)).astype(np.float32)
    xq = rng.standard_normal((1, Q_ROWS)).astype(np.float32)

    # numpy baselines (single run each: numpy is slow)
    ids1 = routed_ids(rng, 1)
    t0 = time.perf_counter()
    ReferenceExpertBackend({0: w}, shape).run(0, x1, ids1)
    numpy_decode_s = time.perf_counter() - t0
    numpy_unembed_s = timeit(lambda: reference_linear(x1, unembed, None), 0, 1)

    results: dict = {"machine": machine}
    rows = []
    for threads in (1, 2):
        native.set_threads(threads)
        yard = bandwidth([stream_buf])
        bw = yard["gbps"]
        results[f"bandwidth_gbps_t{threads}"] = bw
        print(f"{threads} thread(s): bandwidth yardstick {bw:.1f} GB/s (read {yard['read_gbps']:.1f}, with "
              f"prefetches {yard['prefetch_read_gbps']:.1f}, STREAM triad {yard['triad_gbps']:.1f})")
        for precision in ("fast", "exact"):
            def decode():
                layer, ids = next_decode()
                run_experts(layer, x1, ids, precision)
            decode_runs = [("expert decode T=1", decode, f"expert_decode_gbps_{precision}_t{threads}")]
            if precision == "fast":
                # The same 4 experts every call (53 MB, held by a large last-level cache): what the
                # kernel does when memory is not the limit. Cold over cached is how well its
                # weight streams overlap its compute, the gap the bandwidth ratio alone hides.
                first_experts = np.arange(K, dtype=np.int32)[None]
                decode_runs.append(("expert decode T=1, cached", lambda: run_experts(w, x1, first_experts, precision),
                                    f"expert_decode_cached_gbps_t{threads}"))
            for name, fn, key in decode_runs:
                s = timeit(fn, min_time)
                gbps = K * expert_bytes_per_expert() / s / 1e9
                rows.append((threads, precision, name, s, gbps, gbps / bw, numpy_decode_s / s))
                results[key] = gbps
            for T in (128, 512):
                xs = rng.standard_normal((T, H)).astype(np.float32)
                ids = routed_ids(rng, T)
                s = timeit(lambda: run_experts(w, xs, ids, precision), min_time)
                gflops = 2 * T * K * (2 * I * H + H * I) / s / 1e9
                rows.append((threads, precision, f"prefill T={T} gflops={gflops:.1f}", s, float("nan"),
                             float("nan"), float("nan")))
                results[f"prefill{T}_gflops_{precision}_t{threads}"] = gflops
        for name, mats_of_call in (("qkvo T=1", lambda: qkvo_layers[next(layer_of_call) % LAYERS]),
                                   ("unembedding T=1", lambda: [unembed])):
            mats = mats_of_call()

            def dense():
                for m in mats_of_call():
                    x = xq if m.shape[1] == Q_ROWS else x1
                    native.bf16_matmul(x, m, None, np.empty((1, m.shape[0]), np.float32))
            s = timeit(dense, min_time)
            gbps = sum(m.nbytes for m in mats) / s / 1e9
            base = numpy_unembed_s / s if name.startswith("unembed") else float("nan")
            rows.append((threads, "exact", name, s, gbps, gbps / bw, base))
            results[f"{name.split()[0]}_gbps_t{threads}"] = gbps

    print(f"{'thr':>3} {'prec':>5} {'kernel':<34} {'ms':>9} {'GB/s':>7} {'x bw':>6} {'x numpy':>8}")
    for t, p, name, s, gbps, ratio, vs_numpy in rows:
        print(f"{t:>3} {p:>5} {name:<34} {s * 1e3:9.3f} {gbps:7.2f} {ratio:6.2f} {vs_numpy:8.1f}")
    bw2 = results["bandwidth_gbps_t2"]
    summary = {
        "machine": machine,
        "bandwidth_gbps": bw2,
        "expert_decode_gbps": results["expert_decode_gbps_fast_t2"],
        "expert_decode_gbps_exact": results["expert_decode_gbps_exact_t2"],
        "expert_decode_ratio_to_bandwidth": results["expert_decode_gbps_fast_t2"] / bw2,
        "expert_decode_cached_gbps": results["expert_decode_cached_gbps_t2"],
        "expert_decode_cold_to_cached": results["expert_decode_gbps_fast_t2"] / results["expert_decode_cached_gbps_t2"],
        "prefill128_gflops": results["prefill128_gflops_fast_t2"],
        "prefill512_gflops": results["prefill512_gflops_fast_t2"],
        "prefill512_gflops_exact": results["prefill512_gflops_exact_t2"],
        "qkvo_gbps": results["qkvo_gbps_t2"],
        "unembed_gbps": results["unembedding_gbps_t2"],
        "unembed_ratio_to_bandwidth": results["unembedding_gbps_t2"] / bw2,
        "numpy_expert_decode_s": numpy_decode_s,
        "numpy_unembed_s": numpy_unembed_s,
    }
    if args.llama_ops:
        # test-backend-ops gives the CPU backend half the cores: here one thread, so it is set
        # beside our one-thread rows. Its matmul is one 2880 x 2880 projection of 4 experts.
        llama = backend_ops_experts(args.llama_ops)
        llama_gbps = K * (H * I // 2 + H * I // 32) / (llama["decode_us"] * 1e-6) / 1e9
        ours_gbps, ours_gflops = results["expert_decode_gbps_fast_t1"], results["prefill512_gflops_fast_t1"]
        print(f"llama.cpp, same run, 1 thread: expert decode {llama_gbps:.2f} GB/s "
              f"(moemesh {ours_gbps / llama_gbps:.2f}x), prefill T=512 {llama['prefill512_gflops']:.1f} GFLOP/s "
              f"(moemesh {ours_gflops / llama['prefill512_gflops']:.2f}x)")
        summary.update(llamacpp_expert_decode_gbps_t1=llama_gbps,
                       expert_decode_ratio_to_llamacpp_t1=ours_gbps / llama_gbps,
                       llamacpp_prefill512_gflops_t1=llama["prefill512_gflops"],
                       prefill512_ratio_to_llamacpp_t1=ours_gflops / llama["prefill512_gflops"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
