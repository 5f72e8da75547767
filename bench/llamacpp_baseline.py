"""llama.cpp as a same-run baseline for bench/e2e.py (issue 4) and bench/kernels.py (issue 3): the
figures quoted in the issues were measured on another day, and this machine's memory speed moves
by a third from hour to hour, so a ratio means something only when both engines run minutes apart
on the same weights.

llama.cpp is not a dependency; build it by hand from the sources the pip registry carries (the
llama-cpp-python sdist vendors them) and convert the same synthetic checkpoint with its own
converter, so both engines read identical weights (MXFP4 experts, bf16 dense matrices):

    pip download --no-deps --no-build-isolation --no-binary llama-cpp-python llama-cpp-python -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama && cd /tmp/llama/llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j --target llama-bench
    python convert_hf_to_gguf.py /path/gpt-oss-20b --outtype bf16 --outfile /path/gpt-oss-20b.gguf

then `python bench/e2e.py -m /path/gpt-oss-20b --llama-bench build/bin/llama-bench --gguf /path/gpt-oss-20b.gguf`.

Qwen3-MoE (issue 21): our synthetic snapshots carry a stand-in tokenizer (coordinator/tokenizer.py
says why), whose pre-tokenizer llama.cpp's converter does not recognise by hash; it is Qwen2's, so
`python bench/llamacpp_baseline.py convert --llama-dir DIR -m SRC -o OUT.gguf` runs the converter
with the pre-tokenizer named "qwen2" (nothing else changes), then build `llama-quantize` and quantize
the experts to the closest formats with the dense tensors in Q8_0 (as `convert --dense q8`):
`llama-quantize OUT.gguf OUT-mxfp4.gguf MXFP4_MOE` for MXFP4 experts, `llama-quantize --tensor-type
ffn_gate_exps=q4_0 --tensor-type ffn_up_exps=q4_0 --tensor-type ffn_down_exps=q4_0
--output-tensor-type q8_0 --token-embedding-type q8_0 OUT.gguf OUT-q4_0.gguf Q8_0` for Q4 (a plain
`Q4_0` would put the attention in 4 bits too). When the bf16 source does not fit the disk (the full
30B-A3B is 61 GB), bench/gguf_export.py writes our Q4/Q8 checkpoint as a GGUF without
requantizing (our Q4 and Q8 are Q4_0's and Q8_0's values), metadata from a smaller cut's GGUF. On a KVM guest whose AMX llama.cpp cannot use (its
native build died with SIGILL in ggml_backend_amx_mul_mat on Q8_0 tensors on this project's
Sapphire Rapids guest), build the baseline without AMX: `-DGGML_NATIVE=OFF -DGGML_AVX=ON
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON` (AMX options off).
For the kernels, configure with -DLLAMA_BUILD_TESTS=ON, build the target test-backend-ops and run
`python bench/kernels.py --llama-ops build/bin/test-backend-ops` (its perf mode has gpt-oss-20b's
expert matmul: 4 of 32 MXFP4 experts, 2880 x 2880, for 1 and 512 tokens).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys


def read_through(path: str, chunk: int = 64 << 20) -> None:
    """Read a file once so the page cache holds it: llama-bench's warm-up is one short run, and
    after our engine has filled the cache with its own checkpoint, llama.cpp's first runs would
    read from disk (it decoded 3.8-4.6 tok/s right after our engine, 4.9-5.2 run alone)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def _llama_bench_rows(binary: str, gguf: str, args: list[str]) -> list[dict]:
    done = subprocess.run([binary, "-m", gguf, *args, "-o", "json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def llama_bench(binary: str, gguf: str, prompt: int, decode: int, threads: int, repetitions: int = 3) -> dict:
    """Prefill and decode tok/s of llama-bench on a cached GGUF (its own warm-up run first, then
    the mean of `repetitions`), as our engine runs them: the prompt prefilled from an empty
    context, the tokens decoded after it (`-d prompt`: attention over the prompt's cache costs
    both engines the same per token). {"prefill_tps", "decode_tps", "build"}."""
    read_through(gguf)
    common = ["-t", str(threads), "-r", str(repetitions)]
    prefill = _llama_bench_rows(binary, gguf, ["-p", str(prompt), "-n", "0", *common])[0]
    gen = _llama_bench_rows(binary, gguf, ["-p", "0", "-n", str(decode), "-d", str(prompt), *common])[0]
    return {"prefill_tps": float(prefill["avg_ts"]), "decode_tps": float(gen["avg_ts"]),
            "build": f"{prefill.get('build_commit', '?')} ({prefill.get('cpu_info', '?')})"}


def backend_ops_experts(binary: str) -> dict:
    """llama.cpp's CPU kernel for gpt-oss-20b's routed experts (MUL_MAT_ID, MXFP4, 4 of 32
    experts of 2880 x 2880), from test-backend-ops' perf mode: microseconds per run for 1 token
    and GFLOP/s for 512, {"decode_us", "prefill512_gflops"}."""
    pattern = r"MUL_MAT_ID\(type_a=mxfp4,type_b=f32,n_mats=32,n_used=4,b=0,m=2880,n=(1|512),k=2880[^)]*\)"
    cmd = [binary, "perf", "-o", "MUL_MAT_ID", "-b", "CPU", "-p", "type_a=mxfp4.*m=2880,n=(1|512),k=2880"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"test-backend-ops failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    found = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", done.stdout).splitlines():
        m = re.search(pattern + r".*?([0-9.]+) us/run.*?([0-9.]+) GFLOPS", line)
        if m:
            found[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    if set(found) != {1, 512}:
        raise RuntimeError("test-backend-ops printed no gpt-oss-20b MUL_MAT_ID cases for 1 and 512 tokens:\n"
                           + done.stdout[-2000:])
    return {"decode_us": found[1][0], "prefill512_gflops": found[512][1]}


def convert_standin_qwen3(llama_dir: str, src: str, out: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py on a synthetic Qwen3-MoE snapshot (bf16), telling it the
    pre-tokenizer (Qwen2's) it cannot identify from the stand-in vocabulary's hash."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
            "import conversion.base as base\n"
            "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
            "import convert_hf_to_gguf as c\n"
            "sys.argv = ['convert_hf_to_gguf.py', sys.argv[2], '--outtype', 'bf16', '--outfile', sys.argv[3]]\n"
            "c.main()\n")
    subprocess.run([sys.executable, "-c", code, llama_dir, src, out], check=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="llama.cpp baseline helpers")
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a synthetic Qwen3-MoE snapshot to GGUF (bf16)")
    conv.add_argument("--llama-dir", required=True, help="llama.cpp's source folder")
    conv.add_argument("-m", "--model", required=True)
    conv.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    convert_standin_qwen3(args.llama_dir, args.model, args.out)
