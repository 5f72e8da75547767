"""llama.cpp as a same-run baseline for bench/e2e.py (issue 4): the figures quoted in the issues
were measured on another day, and this machine's memory speed moves by a third from hour to hour,
so a ratio means something only when both engines run minutes apart on the same weights.

llama.cpp is not a dependency; build it by hand from the sources the pip registry carries (the
llama-cpp-python sdist vendors them) and convert the same synthetic checkpoint with its own
converter, so both engines read identical weights (MXFP4 experts, bf16 dense matrices):

    pip download --no-deps --no-build-isolation --no-binary llama-cpp-python llama-cpp-python -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama && cd /tmp/llama/llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j --target llama-bench
    python convert_hf_to_gguf.py /path/gpt-oss-20b --outtype bf16 --outfile /path/gpt-oss-20b.gguf

then `python bench/e2e.py -m /path/gpt-oss-20b --llama-bench build/bin/llama-bench --gguf /path/gpt-oss-20b.gguf`.
"""
from __future__ import annotations

import json
import subprocess


def read_through(path: str, chunk: int = 64 << 20) -> None:
    """Read a file once so the page cache holds it: llama-bench's warm-up is one short run, and
    after our engine has filled the cache with its own checkpoint, llama.cpp's first runs would
    read from disk (it decoded 3.8-4.6 tok/s right after our engine, 4.9-5.2 run alone)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def llama_bench(binary: str, gguf: str, prompt: int, decode: int, threads: int, repetitions: int = 3) -> dict:
    """Prefill and decode tok/s of llama-bench on a cached GGUF (its own warm-up run first, then
    the mean of `repetitions`): {"prefill_tps", "decode_tps", "build"}."""
    read_through(gguf)
    cmd = [binary, "-m", gguf, "-p", str(prompt), "-n", str(decode), "-t", str(threads),
           "-r", str(repetitions), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    rows = json.loads(done.stdout)
    prefill = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    gen = next(r for r in rows if r["n_prompt"] == 0 and r["n_gen"] == decode)
    return {"prefill_tps": float(prefill["avg_ts"]), "decode_tps": float(gen["avg_ts"]),
            "build": f"{prefill.get('build_commit', '?')} ({prefill.get('cpu_info', '?')})"}
