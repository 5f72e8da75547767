"""ARM proxy for the NEON kernels (issue 18): no ARM hardware is here, so their cost is measured as
the instructions they execute per weight byte, counted under qemu, beside llama.cpp's NEON dot
products cross-compiled with the same compiler and flags, on one gpt-oss-20b expert matrix shape
(rows of 2880 weights: 90 blocks), so the count covers everything per row (loop, scales, tail, the
call), not just the inner loop's body:
- decode, one token: our MXFP4 dot product (sdot; vmlal for the Cortex-A72) against
  ggml_vec_dot_mxfp4_q8_0 (sdot);
- prefill, 16 tokens: our Q4 matrix tiles (smmla, two rows x two tokens an instruction) and our
  sdot kernel on 4-token passes, against llama.cpp's int8-matrix-multiply path of
  ggml_vec_dot_q4_0_q8_0 (two rows x two tokens a call, the same weight bytes: Q4 is Q4_0's
  values), per weight byte and token. The activations' packing (ours) and quantization (llama.cpp's
  q8_0) happen once per token for all rows and are not counted on either side.

An instruction count is no timing (a Cortex-A76 retires 4 a cycle when nothing stalls; memory
stalls are the same for both, which read the same weight bytes), but it is what the compiled
code asks of the core, and the ratio of two counts on the same shapes is a fair comparison of the
work each kernel does for a byte of weights.

    python bench/neon_proxy.py --llama-src /path/llama.cpp   (the sources llamacpp_baseline.py fetches)

Needs g++-aarch64-linux-gnu and qemu-user. Counting: qemu-aarch64 -singlestep -d exec logs
every executed instruction with its address; those inside the kernel's symbol are counted.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ROWS, BLOCKS = 64, 90  # 64 rows of gpt-oss-20b's 2880: 5760 blocks
FLAGS = ["-O3", "-march=armv8.2-a+dotprod+i8mm", "-static"]
TOKENS = 16  # a matrix-tile group (csrc/kernels.h kTileTokens)

OURS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "kernels.h"
using namespace moemesh;
int prefill(const KernelTable& kt, bool tiles);
int main(int argc, char** argv) {
    if (argv[1][0] == 'm') return prefill(kNeonI8mmKernels, true);
    if (argv[1][0] == 'p') return prefill(kNeonDotKernels, false);
    const KernelTable& kt = argv[1][0] == 'd' ? kNeonDotKernels : kNeonKernels;
    const int64_t rows = ROWS, nb = BLOCKS;
    std::vector<uint8_t> blocks(rows * nb * 16), scales(rows * nb);
    for (auto& b : blocks) b = uint8_t(rand());
    for (auto& s : scales) s = uint8_t(118 + rand() % 5);
    std::vector<int16_t> q(nb * 32);
    std::vector<float> d(nb, 0.01f);
    std::vector<int32_t> s(nb, 0);
    for (auto& v : q) v = int16_t(rand() % 65279 - 32639);
    if (kt.q16_layout) kt.q16_layout(q.data(), nb);
    const Q16Row x{q.data(), d.data(), s.data()};
    float out, sum = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
        kt.of(WeightFormat::Mxfp4).dot_q16(blocks.data() + r * nb * 16, scales.data() + r * nb, nb, &x, 1, &out);
        sum += out;
    }
    std::printf("%g\n", sum);
}
// TOKENS tokens through ROWS Q4 rows: matrix tiles (one packed group) or 4-token passes.
int prefill(const KernelTable& kt, bool tiles) {
    const int64_t rows = ROWS, nb = BLOCKS;
    std::vector<uint8_t> blocks(rows * nb * 16);
    std::vector<uint16_t> scales(rows * nb, 0x2000);
    for (auto& b : blocks) b = uint8_t(rand());
    std::vector<std::vector<int16_t>> q(TOKENS, std::vector<int16_t>(nb * 32));
    std::vector<float> d(nb, 0.01f);
    std::vector<int32_t> s(nb, 0);
    std::vector<Q16Row> x;
    for (auto& row : q) {
        for (auto& v : row) v = int16_t(rand() % 65279 - 32639);
        kt.q16_layout(row.data(), nb);
        x.push_back({row.data(), d.data(), s.data()});
    }
    const FormatKernels& q4 = kt.of(WeightFormat::Q4);
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(scales.data());
    std::vector<float> out(rows * TOKENS);
    if (tiles) {
        std::vector<int8_t> packed(kt.tile_group_bytes(WeightFormat::Q4, nb));
        kt.tile_pack(WeightFormat::Q4, x.data(), TOKENS, nb, packed.data());
        q4.tile_q16(blocks.data(), sb, nb, rows, packed.data(), 1, out.data());
    } else {
        for (int64_t r = 0; r < rows; ++r)
            for (int t = 0; t < TOKENS; t += 4)
                q4.dot_q16(blocks.data() + r * nb * 16, sb + r * nb * 2, nb, x.data() + t, 4, out.data() + r * TOKENS + t);
    }
    float sum = 0.f;
    for (float v : out) sum += v;
    std::printf("%g\n", sum);
    return 0;
}
"""

# Our MXFP4 dot product: the format's kernel and whatever the compiler kept out of line under it.
MXFP4_DOT = r"nibbles_dot_q16<moemesh::Mxfp4>|NibbleRow<moemesh::Mxfp4>"
# Our Q4 matrix tiles (what tile_q16 runs, not the packing) and our Q4 sdot kernel.
Q4_TILES = r"nibbles_tile_q16<moemesh::Q4>|i8mm_row_pair<.*Q4>|i8mm_tiles<|NibbleRow<moemesh::Q4>"
Q4_DOT = r"nibbles_dot_q16<moemesh::Q4>|NibbleRow<moemesh::Q4>"

LLAMA = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
void ggml_vec_dot_mxfp4_q8_0(int n, float* s, size_t bs, const void* vx, size_t bx, const void* vy, size_t by, int nrc);
float ggml_table_f32_ue4m3[256];                              /* referenced by other kernels in the file */
void quantize_row_q8_K_ref(const float* x, void* y, int64_t k) { (void)x; (void)y; (void)k; abort(); }
typedef struct { uint8_t e; uint8_t qs[16]; } block_mxfp4;
typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;
void ggml_vec_dot_q4_0_q8_0(int n, float* s, size_t bs, const void* vx, size_t bx, const void* vy, size_t by, int nrc);
typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;
/* TOKENS tokens through ROWS Q4_0 rows, two rows x two tokens a call (its i8mm path). */
static int prefill(void) {
    enum { rows = ROWS, nb = BLOCKS };
    static block_q4_0 w[rows * nb];
    static block_q8_0 x[TOKENS * nb];
    static float out[rows * TOKENS];
    for (int i = 0; i < rows * nb; ++i) { w[i].d = 0x2000; for (int j = 0; j < 16; ++j) w[i].qs[j] = rand(); }
    for (int i = 0; i < TOKENS * nb; ++i) { x[i].d = 0x2000; for (int j = 0; j < 32; ++j) x[i].qs[j] = rand(); }
    for (int r = 0; r < rows; r += 2)
        for (int t = 0; t < TOKENS; t += 2)
            ggml_vec_dot_q4_0_q8_0(nb * 32, out + r * TOKENS + t, TOKENS * sizeof(float), w + r * nb, nb * sizeof(block_q4_0),
                                   x + t * nb, nb * sizeof(block_q8_0), 2);
    float sum = 0.f;
    for (int i = 0; i < rows * TOKENS; ++i) sum += out[i];
    printf("%g\n", sum);
    return 0;
}
int main(int argc, char** argv) {
    if (argc > 1) return prefill();
    enum { rows = ROWS, nb = BLOCKS };
    static block_mxfp4 w[rows * nb];
    static block_q8_0 x[nb];
    for (int i = 0; i < rows * nb; ++i) { w[i].e = 118 + rand() % 5; for (int j = 0; j < 16; ++j) w[i].qs[j] = rand(); }
    for (int i = 0; i < nb; ++i) { x[i].d = 0x2000; for (int j = 0; j < 32; ++j) x[i].qs[j] = rand(); }
    float out, sum = 0.f;
    for (int r = 0; r < rows; ++r) { ggml_vec_dot_mxfp4_q8_0(nb * 32, &out, 0, w + r * nb, 0, x, 0, 1); sum += out; }
    printf("%g\n", sum);
    return 0;
}
"""


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def symbol_spans(exe: Path, pattern: str) -> list[tuple[int, int]]:
    """[start, end) of every defined function whose demangled name matches pattern (each build of
    a kernel is its own symbol; only the one the program selects executes)."""
    out = run(["aarch64-linux-gnu-nm", "-C", "-S", "--defined-only", exe]).stdout
    fields = [line.split(None, 3) for line in out.splitlines() if re.search(pattern, line)]
    spans = [(int(f[0], 16), int(f[0], 16) + int(f[1], 16)) for f in fields if len(f) == 4 and f[2] in "tT"]
    if not spans:
        raise RuntimeError(f"no function matching {pattern} in {exe}")
    return spans


def executed_in(exe: Path, args: list, spans: list[tuple[int, int]], cpu: str) -> int:
    """Instructions executed inside spans, counted from qemu's per-instruction exec log."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        run(["qemu-aarch64", "-cpu", cpu, "-singlestep", "-d", "exec,nochain", "-D", log.name, exe, *args])
        count = 0
        pc = re.compile(rb"Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/")
        with open(log.name, "rb") as f:
            for line in f:
                m = pc.match(line)
                if m and any(lo <= int(m.group(1), 16) < hi for lo, hi in spans):
                    count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-src", required=True, help="llama.cpp's source tree (vendor/llama.cpp of the sdist)")
    args = ap.parse_args()
    llama = Path(args.llama_src)
    defines = [f"-DROWS={ROWS}", f"-DBLOCKS={BLOCKS}", f"-DTOKENS={TOKENS}"]
    weight_bytes = ROWS * BLOCKS * 17  # MXFP4: 16 code bytes and a scale byte a block
    q4_bytes = ROWS * BLOCKS * 18  # Q4 and Q4_0: 16 code bytes and an fp16 scale
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = tmp / "moemesh"
        run(["cmake", "-S", CSRC / "check", "-B", build, "-DCMAKE_BUILD_TYPE=Release",
             "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DCMAKE_SYSTEM_NAME=Linux",
             "-DCMAKE_SYSTEM_PROCESSOR=aarch64"])
        run(["cmake", "--build", build, "-j2", "--target", "moemesh_kernels"])
        (tmp / "ours.cpp").write_text(OURS)
        ours = tmp / "ours"
        run(["aarch64-linux-gnu-g++", *FLAGS, *defines, "-std=c++17", f"-I{CSRC}", tmp / "ours.cpp",
             build / "libmoemesh_kernels.a", "-lpthread", "-o", ours])
        (tmp / "llama.c").write_text(LLAMA)
        theirs = tmp / "llama"
        run(["aarch64-linux-gnu-gcc", *FLAGS, *defines, "-DGGML_USE_CPU", f"-I{llama}/ggml/include",
             f"-I{llama}/ggml/src", f"-I{llama}/ggml/src/ggml-cpu", tmp / "llama.c",
             llama / "ggml/src/ggml-cpu/arch/arm/quants.c", "-lm", "-o", theirs])
        def table(title, runs, per):
            rows = [(name, executed_in(exe, argv, symbol_spans(exe, pattern), cpu) / per) for name, exe, argv, pattern, cpu in runs]
            base = rows[-1][1]
            print(f"{title} (aarch64-linux-gnu-g++ {' '.join(FLAGS[:2])}, qemu-aarch64):")
            for name, count in rows:
                print(f"  {name:<52} {count:6.3f}  {count / base:.2f}x llama.cpp")
            return dict(rows)

        decode = table(f"decode: instructions executed per weight byte, {ROWS} rows x {BLOCKS} MXFP4 blocks, one token", (
            ("moemesh neon+dotprod (sdot)", ours, ["d"], MXFP4_DOT, "max"),
            ("moemesh neon (vmlal, Cortex-A72)", ours, ["b"], MXFP4_DOT, "cortex-a72"),
            ("llama.cpp ggml_vec_dot_mxfp4_q8_0 (sdot)", theirs, [], r" ggml_vec_dot_mxfp4_q8_0$", "max")), weight_bytes)
        prefill = table(f"prefill: instructions executed per weight byte and token, {ROWS} rows x {BLOCKS} Q4 blocks, "
                        f"{TOKENS} tokens", (
            ("moemesh neon+i8mm Q4 tiles (smmla)", ours, ["m"], Q4_TILES, "max"),
            ("moemesh neon+dotprod Q4, 4-token passes (sdot)", ours, ["p"], Q4_DOT, "max"),
            ("llama.cpp ggml_vec_dot_q4_0_q8_0, 2x2 (smmla)", theirs, ["p"], r" ggml_vec_dot_q4_0_q8_0$", "max")),
            q4_bytes * TOKENS)
    print(json.dumps({"decode": decode, "prefill": prefill}))


if __name__ == "__main__":
    main()
