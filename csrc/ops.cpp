#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include <unistd.h>

#include "attention.h"
#include "formats.h"
#include "threadpool.h"

namespace moemesh {

namespace {
// Calls fn(begin, end) on the thread pool for [0, n) cut into ranges of per_task (the last shorter).
template <typename Fn>
void for_ranges(int64_t n, int64_t per_task, const Fn& fn) {
    global_pool().parallel_for((n + per_task - 1) / per_task, [&](int64_t task) {
        fn(task * per_task, std::min(n, (task + 1) * per_task));
    });
}

// Runs step(i, j) for j in [0, length(i)) of every task i in [0, n), two tasks per pool task in
// alternation: step j of task i, then step j of task i + n/2. Where each step reads one weight
// row, a core then keeps two hardware prefetch streams going besides its software prefetches,
// which a KVM guest's core cannot keep enough of in flight (2-thread expert decode +3-6%).
template <typename Length, typename Step>
void in_two_streams(int64_t n, const Length& length, const Step& step) {
    const int64_t half = (n + 1) / 2;
    global_pool().parallel_for(half, [&](int64_t i) {
        const int64_t len_a = length(i), len_b = i + half < n ? length(i + half) : 0;
        for (int64_t j = 0; j < std::max(len_a, len_b); ++j) {
            if (j < len_a) step(i, j);
            if (j < len_b) step(i + half, j);
        }
    });
}

// Blocks per task when a whole buffer is (de)quantized at once.
constexpr int64_t kQ16BlocksPerTask = 1024;

// A block's scale (block max / kMax) and what its values are multiplied by before rounding.
struct Q16Scale {
    float d, inv;
};
inline Q16Scale q16_block_scale(const float* xb) {
    float amax[4] = {0.f, 0.f, 0.f, 0.f};  // a max is exact in any order; four chains vectorize
    for (int i = 0; i < Q16Block::kBlock; i += 4)
        for (int j = 0; j < 4; ++j) amax[j] = std::max(amax[j], std::fabs(xb[i + j]));
    const float d = std::max(std::max(amax[0], amax[1]), std::max(amax[2], amax[3])) / Q16Block::kMax;
    return {d, d > 0.f ? 1.f / d : 0.f};
}
}  // namespace

// Symmetric per-32 int16 quantization, round half to even: numpy's q16_quantize, operation for
// operation in float32, so codes made here and in Python are the same bits.
void q16_quantize(const float* x, int64_t n, int16_t* q, float* d) {
    for (int64_t g = 0; g < n / Q16Block::kBlock; ++g) {
        const float* xb = x + g * Q16Block::kBlock;
        const Q16Scale sc = q16_block_scale(xb);
        for (int i = 0; i < Q16Block::kBlock; ++i) q[g * Q16Block::kBlock + i] = int16_t(round_half_even(xb[i] * sc.inv));
        d[g] = sc.d;
    }
}

void q16_dequantize(const int16_t* q, const float* d, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = float(q[i]) * d[i / Q16Block::kBlock];
}

void q16_round_parallel(const float* x, int64_t n, float* out) {
    // The rounded code times the scale without the int16 in between (the code is an integer the
    // float holds exactly): the same bits as q16_dequantize(q16_quantize(x)), in loops that vectorize.
    for_ranges(n / Q16Block::kBlock, kQ16BlocksPerTask, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
            const float* xb = x + g * Q16Block::kBlock;
            const Q16Scale sc = q16_block_scale(xb);
            for (int i = 0; i < Q16Block::kBlock; ++i) out[g * Q16Block::kBlock + i] = round_half_even(xb[i] * sc.inv) * sc.d;
        }
    });
}

void q16_quantize_parallel(const float* x, int64_t n, int16_t* q, float* d) {
    for_ranges(n / Q16Block::kBlock, kQ16BlocksPerTask, [&](int64_t g0, int64_t g1) {
        q16_quantize(x + g0 * Q16Block::kBlock, (g1 - g0) * Q16Block::kBlock, q + g0 * Q16Block::kBlock, d + g0);
    });
}

void q16_dequantize_parallel(const int16_t* q, const float* d, int64_t n, float* out) {
    for_ranges(n / Q16Block::kBlock, kQ16BlocksPerTask, [&](int64_t g0, int64_t g1) {
        q16_dequantize(q + g0 * Q16Block::kBlock, d + g0, (g1 - g0) * Q16Block::kBlock, out + g0 * Q16Block::kBlock);
    });
}

namespace {

// Rows per task: enough tasks to balance two to a few dozen threads, few enough to amortise.
constexpr int64_t kRowsPerTask = 256;

// Buffers of one moe_experts call, kept per calling thread: fresh ones each call cost page faults
// (the allocator returns freed memory to the system) on every decoded token.
struct Scratch {
    std::vector<int16_t> q;
    std::vector<float> d;
    std::vector<int32_t> s;
};

// Activations of one matmul: fp32 rows, plus their q16 twins (in `scratch`) when the precision is fast.
struct Activations {
    const float* f32;
    int64_t ld;  // floats per row (= K)
    bool fast_;
    const int16_t* q = nullptr;
    const float* d = nullptr;
    const int32_t* s = nullptr;

    Activations(const KernelTable& kt, Precision p, const float* x, int64_t rows, int64_t k, Scratch& scratch)
        : f32(x), ld(k), fast_(p == Precision::Fast) {
        if (!fast_) return;
        const int64_t nb = k / Q16Block::kBlock;
        q = moemesh::scratch(scratch.q, size_t(rows * k));
        d = moemesh::scratch(scratch.d, size_t(rows * nb));
        s = moemesh::scratch(scratch.s, size_t(rows * nb));
        global_pool().parallel_for(rows, [&](int64_t r) {
            int16_t* qr = scratch.q.data() + r * k;
            q16_quantize(x + r * k, k, qr, scratch.d.data() + r * nb);
            for (int64_t g = 0; g < nb; ++g) {
                int32_t sum = 0;
                for (int i = 0; i < Q16Block::kBlock; ++i) sum += qr[g * Q16Block::kBlock + i];
                scratch.s[size_t(r * nb + g)] = sum;
            }
            if (kt.q16_layout) kt.q16_layout(qr, nb);
        });
    }
    bool fast() const { return fast_; }
    Q16Row row(int64_t r) const {
        const int64_t nb = ld / Q16Block::kBlock;
        return {q + r * ld, d + r * nb, s + r * nb};
    }
};

// The first n of a matmul's activation rows, packed for the matrix unit kTileTokens at a time.
struct TiledRows {
    const int8_t* groups = nullptr;
    int64_t n = 0;
    int64_t n_groups() const { return (n + kTileTokens - 1) / kTileTokens; }
};

// Fewest tokens worth a tile group of kTileTokens (the rest take 4-token passes).
constexpr int64_t kTileMinTokens = 8;

// Tile groups for n tokens: whole groups, and a last one when enough tokens are left for it.
int64_t tile_groups_for(int64_t n) { return n / kTileTokens + (n % kTileTokens >= kTileMinTokens ? 1 : 0); }

// Tile results res[(g * rows + r) * kTileTokens + t] for tokens i = g * kTileTokens + t < n_tok ->
// y[out_row(i) * ldy + r0 + r] = result + bias_of(r0 + r).
template <typename OutRow, typename Bias>
void store_tile_results(const float* res, int64_t n_tok, int64_t r0, int64_t rows, const OutRow& out_row,
                        int64_t ldy, const Bias& bias_of, float* y) {
    for (int64_t i = 0; i < n_tok; ++i) {
        const float* ri = res + (i / kTileTokens * rows) * kTileTokens + i % kTileTokens;
        float* yi = y + out_row(i) * ldy + r0;
        for (int64_t r = 0; r < rows; ++r) yi[r] = ri[r * kTileTokens] + bias_of(r0 + r);
    }
}

// A matrix in one weight format: rows of n_blocks blocks, values and scales as the format stores them.
struct QuantRows {
    const FormatKernels& kernels;
    const FormatInfo& info;
    const uint8_t* values;
    const uint8_t* scales;
    int64_t n_blocks;

    QuantRows(const KernelTable& kt, WeightFormat f, const uint8_t* v, const uint8_t* s, int64_t nb)
        : kernels(kt.of(f)), info(format_info(f)), values(v), scales(s), n_blocks(nb) {}
    const uint8_t* values_of(int64_t r) const { return values + r * n_blocks * info.block_bytes; }
    const uint8_t* scales_of(int64_t r) const { return scales + r * n_blocks * info.scale_bytes; }
    int64_t row_bytes() const { return n_blocks * (info.block_bytes + info.scale_bytes); }
};

// y[out_row(i) * ldy + r] = W[r] . act[in_row(i)] + bias[r] for rows r in [r0, r1) and the listed
// activation rows: the tiled ones a group at a time, the rest kMaxTokens at a time over all rows.
void quant_rows(const QuantRows& w, const uint16_t* bias, int64_t r0, int64_t r1, const Activations& act,
                const int64_t* in_rows, const int64_t* out_rows, int64_t n, const TiledRows& tiled, float* y,
                int64_t ldy) {
    auto bias_of = [&](int64_t r) { return bias ? bf16_to_f32(bias[r]) : 0.f; };
    const int64_t nb = w.n_blocks;
    if (tiled.n > 0) {
        const int64_t rows = r1 - r0;
        thread_local std::vector<float> res;
        scratch(res, size_t(tiled.n_groups() * rows * kTileTokens));
        w.kernels.tile_q16(w.values_of(r0), w.scales_of(r0), nb, rows, tiled.groups, tiled.n_groups(), res.data());
        store_tile_results(res.data(), tiled.n, r0, rows, [&](int64_t i) { return out_rows[i]; }, ldy, bias_of, y);
    }
    for (int64_t i0 = tiled.n; i0 < n; i0 += kMaxTokens) {
        const int cnt = int(std::min<int64_t>(kMaxTokens, n - i0));
        for (int64_t r = r0; r < r1; ++r) {
            float res[kMaxTokens];
            if (act.fast()) {
                Q16Row xs[kMaxTokens];
                for (int j = 0; j < cnt; ++j) xs[j] = act.row(in_rows[i0 + j]);
                w.kernels.dot_q16(w.values_of(r), w.scales_of(r), nb, xs, cnt, res);
            } else {
                const float* xs[kMaxTokens];
                for (int j = 0; j < cnt; ++j) xs[j] = act.f32 + in_rows[i0 + j] * act.ld;
                w.kernels.dot_f32(w.values_of(r), w.scales_of(r), nb, xs, cnt, res);
            }
            for (int j = 0; j < cnt; ++j) y[out_rows[i0 + j] * ldy + r] = res[j] + bias_of(r);
        }
    }
}

// Lists of activation rows (one per expert, or one for a dense matmul), each packed for the matrix
// unit kTileTokens at a time; none without the format's matrix-unit kernel or with exact precision.
class TileGroups {
public:
    TileGroups(const KernelTable& kt, WeightFormat format, const Activations& act, int64_t nb,
               const std::vector<std::vector<int64_t>>& rows_by_expert, std::vector<int8_t>& storage) {
        const size_t E = rows_by_expert.size();
        first_group_.assign(E, 0);
        n_tiled_.assign(E, 0);
        if (!kt.of(format).tile_q16 || !act.fast()) return;
        group_bytes_ = kt.tile_group_bytes(format, nb);
        std::vector<std::pair<size_t, int64_t>> jobs;  // (expert, first row of the group)
        for (size_t e = 0; e < E; ++e) {
            const int64_t n = int64_t(rows_by_expert[e].size());
            const int64_t groups = tile_groups_for(n);
            first_group_[e] = int64_t(jobs.size());
            n_tiled_[e] = std::min(n, groups * kTileTokens);
            for (int64_t g = 0; g < groups; ++g) jobs.push_back({e, g * kTileTokens});
        }
        groups_ = cache_aligned(storage, size_t(int64_t(jobs.size()) * group_bytes_));
        global_pool().parallel_for(int64_t(jobs.size()), [&](int64_t j) {
            const auto [e, i0] = jobs[size_t(j)];
            const int cnt = int(std::min<int64_t>(kTileTokens, n_tiled_[e] - i0));
            Q16Row xs[kTileTokens];
            for (int i = 0; i < cnt; ++i) xs[i] = act.row(rows_by_expert[e][size_t(i0 + i)]);
            kt.tile_pack(format, xs, cnt, nb, groups_ + j * group_bytes_);
        });
    }
    TiledRows of(int64_t expert) const {
        return {groups_ + first_group_[size_t(expert)] * group_bytes_, n_tiled_[size_t(expert)]};
    }
    bool any() const {
        return std::any_of(n_tiled_.begin(), n_tiled_.end(), [](int64_t n) { return n > 0; });
    }

private:
    int8_t* groups_ = nullptr;
    int64_t group_bytes_ = 0;
    std::vector<int64_t> first_group_, n_tiled_;
};

// Rows of h are interleaved (gate even, up odd). gpt-oss's activation: gate = min(g, limit),
// up = clamp(u, -limit, limit), out = gate * sigmoid(alpha * gate) * (up + 1); the plain one
// (Qwen3-MoE): out = gate * sigmoid(gate) * up.
void swiglu(const float* h, int64_t inter, const MoeWeights& w, float* out) {
    if (!w.clamped) {
        for (int64_t j = 0; j < inter; ++j) out[j] = h[2 * j] / (1.f + std::exp(-h[2 * j])) * h[2 * j + 1];
        return;
    }
    const float alpha = w.swiglu_alpha, limit = w.swiglu_limit;
    for (int64_t j = 0; j < inter; ++j) {
        const float gate = std::min(h[2 * j], limit);
        const float up = std::min(std::max(h[2 * j + 1], -limit), limit);
        out[j] = gate / (1.f + std::exp(-alpha * gate)) * (up + 1.f);
    }
}

}  // namespace

void mxfp4_dequant(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t n_blocks,
                   float* out) {
    global_pool().parallel_for(rows, [&](int64_t r) {
        for (int64_t g = 0; g < n_blocks; ++g)
            Mxfp4::decode_block(blocks + (r * n_blocks + g) * Mxfp4::kBlockBytes, scales[r * n_blocks + g],
                                out + (r * n_blocks + g) * Mxfp4::kBlock);
    });
}

// A cache's size as Linux reports it (sysconf name), or `fallback` where it reports none.
int64_t cache_bytes(int name, int64_t fallback) {
    const long v = sysconf(name);
    return v > 0 ? int64_t(v) : fallback;
}

// Rows of row_bytes that every token pass can re-read from L2: a quarter of it, as two hardware
// threads may share one. (A task's 256 bf16 rows of 2880 are 1.5 MB: re-read from L3 for every
// pass, the AVX2 prefill matmul ran at 37-75 GFLOP/s on two threads.)
int64_t rows_held_in_l2(int64_t row_bytes) {
    static const int64_t l2_bytes = cache_bytes(_SC_LEVEL2_CACHE_SIZE, 256 << 10);
    return std::max<int64_t>(8, l2_bytes / 4 / std::max<int64_t>(row_bytes, 1));
}

// Calls dot(r0, r1, t0, cnt) over rows [0, N) for every pass of up to kMaxTokens tokens, in
// parallel over row tasks; within a task, each pass goes over a block of rows that stays in L2
// while its activations stay in L1. Each row's result does not depend on the grouping.
template <typename Dot>
void for_rows_and_token_passes(int64_t N, int64_t T, int64_t row_bytes, const Dot& dot) {
    const int64_t block = rows_held_in_l2(row_bytes);
    for_ranges(N, kRowsPerTask, [&](int64_t r0, int64_t r1) {
        for (int64_t b0 = r0; b0 < r1; b0 += block) {
            const int64_t b1 = std::min(r1, b0 + block);
            for (int64_t t0 = 0; t0 < T; t0 += kMaxTokens) dot(b0, b1, t0, int(std::min<int64_t>(kMaxTokens, T - t0)));
        }
    });
}

// Matrix tiles over rows [0, rows) in tasks of kRowsPerTask: tile(r0, n, res) fills res for rows
// [r0, r0 + n) and every tiled token, which then go to y[t * ldy + r] (+ bias_of(r)).
template <typename Tile, typename Bias>
void dense_tile_rows(int64_t rows, const TiledRows& tiled, const Tile& tile, const Bias& bias_of, int64_t ldy,
                     float* y) {
    for_ranges(rows, kRowsPerTask, [&](int64_t r0, int64_t r1) {
        const int64_t n = r1 - r0;
        thread_local std::vector<float> res;
        scratch(res, size_t(tiled.n_groups() * n * kTileTokens));
        tile(r0, n, res.data());
        store_tile_results(res.data(), tiled.n, r0, n, [](int64_t i) { return i; }, ldy, bias_of, y);
    });
}

void bf16_matmul(const KernelTable& kt, const float* x, int64_t T, int64_t K, const uint16_t* w,
                 int64_t N, const uint16_t* bias, float* y) {
    auto bias_of = [&](int64_t r) { return bias ? bf16_to_f32(bias[r]) : 0.f; };
    // Matrix tiles take whole groups of 16 tokens over the rows in whole groups of 64 (prefill);
    // fewer than kTileTokens tokens (a verified chunk of drafts) take the vector kernels, where each
    // token gets the bits it would get alone.
    int64_t tiled_tokens = 0, tiled_rows = 0;
    if (kt.bf16_tile_f32 && K % 32 == 0 && N >= kBf16TileRows) {
        const int64_t groups = T / kTileTokens;
        tiled_tokens = groups * kTileTokens;
        tiled_rows = N / kBf16TileRows * kBf16TileRows;
        if (groups > 0) {
            thread_local std::vector<int8_t> storage;
            const int64_t group_bytes = kt.bf16_tile_bytes(K);
            int8_t* packed = cache_aligned(storage, size_t(groups * group_bytes));
            global_pool().parallel_for(groups, [&](int64_t g) {
                const float* xs[kTileTokens];
                const int cnt = int(std::min<int64_t>(kTileTokens, tiled_tokens - g * kTileTokens));
                for (int i = 0; i < cnt; ++i) xs[i] = x + (g * kTileTokens + i) * K;
                kt.bf16_tile_pack(xs, cnt, K, packed + g * group_bytes);
            });
            dense_tile_rows(tiled_rows, TiledRows{packed, tiled_tokens}, [&](int64_t r0, int64_t n, float* res) {
                kt.bf16_tile_f32(w + r0 * K, K, n, packed, groups, res);
            }, bias_of, N, y);
        }
    }
    // The vector kernels' activations: laid out for the ISA, each row on a cache line of its own
    // (a 64-byte load across two lines costs two: std::vector's 16-byte alignment halved the
    // unembedding's speed at 4 tokens). Only the tokens they read: none when the tiles took all.
    const int64_t ldx = (K + 15) / 16 * 16;
    const int64_t first_vector_token = tiled_rows < N ? 0 : tiled_tokens;
    thread_local std::vector<float> storage;
    float* laid_out = cache_aligned(storage, size_t(T * ldx));
    for (int64_t t = first_vector_token; t < T; ++t) {
        std::copy(x + t * K, x + (t + 1) * K, laid_out + t * ldx);
        if (kt.bf16_layout) kt.bf16_layout(laid_out + t * ldx, K);
    }
    // Rows [r_begin, N) x tokens [t_begin, t_end) on the vector kernels.
    auto vector_part = [&](int64_t r_begin, int64_t t_begin, int64_t t_end) {
        for_rows_and_token_passes(N - r_begin, t_end - t_begin, K * 2, [&](int64_t i0, int64_t i1, int64_t p0, int cnt) {
            const int64_t t0 = t_begin + p0;
            const float* xs[kMaxTokens];
            thread_local std::vector<float> res;
            scratch(res, size_t((i1 - i0) * cnt));
            for (int j = 0; j < cnt; ++j) xs[j] = laid_out + (t0 + j) * ldx;
            kt.bf16_dot_f32(w + (r_begin + i0) * K, i1 - i0, K, xs, cnt, res.data());
            for (int64_t i = i0; i < i1; ++i)
                for (int j = 0; j < cnt; ++j) y[(t0 + j) * N + r_begin + i] = res[(i - i0) * cnt + j] + bias_of(r_begin + i);
        });
    };
    vector_part(0, tiled_tokens, T);
    if (tiled_tokens > 0 && tiled_rows < N) vector_part(tiled_rows, 0, tiled_tokens);
}

// Largest finite fp16: Q4 and Q8 scales saturate there (formats.py's FP16_MAX).
constexpr float kF16Max = 65504.f;

void q8_quantize(const uint16_t* w, int64_t N, int64_t K, int8_t* values, uint16_t* scales) {
    const int64_t nb = K / Q8::kBlock;
    global_pool().parallel_for(N, [&](int64_t r) {
        for (int64_t g = 0; g < nb; ++g) {
            const uint16_t* wb = w + r * K + g * Q8::kBlock;
            float amax = 0.f;
            for (int i = 0; i < Q8::kBlock; ++i) amax = std::max(amax, std::fabs(bf16_to_f32(wb[i])));
            const uint16_t d16 = f32_to_f16(std::min(amax / Q8::kMax, kF16Max));  // saturated
            const float d = f16_to_f32(d16);  // quantize against the scale as stored
            const float id = d > 0.f ? 1.f / d : 0.f;
            for (int i = 0; i < Q8::kBlock; ++i) {
                const long v = std::lround(bf16_to_f32(wb[i]) * id);
                values[r * K + g * Q8::kBlock + i] = int8_t(std::max(-127L, std::min(127L, v)));
            }
            scales[r * nb + g] = d16;
        }
    });
}

void weight_layout(const KernelTable& kt, WeightFormat f, uint8_t* values, int64_t rows, int64_t n_blocks) {
    const auto layout = kt.of(f).weight_layout;
    if (!layout) return;
    const int64_t row_bytes = n_blocks * format_info(f).block_bytes;
    global_pool().parallel_for(rows, [&](int64_t r) { layout(values + r * row_bytes, n_blocks); });
}

void q8_copy(const KernelTable& kt, const uint16_t* w, int64_t N, int64_t K, int8_t* values, uint16_t* scales) {
    q8_quantize(w, N, K, values, scales);
    weight_layout(kt, WeightFormat::Q8, reinterpret_cast<uint8_t*>(values), N, K / Q8::kBlock);
}

void q4_quantize(const uint16_t* w, int64_t N, int64_t K, uint8_t* blocks, uint16_t* scales) {
    const int64_t nb = K / Q4::kBlock;
    global_pool().parallel_for(N, [&](int64_t r) {
        for (int64_t g = 0; g < nb; ++g) {
            const uint16_t* wb = w + r * K + g * Q4::kBlock;
            float extreme = 0.f;  // the value of largest magnitude, the first on ties
            for (int i = 0; i < Q4::kBlock; ++i)
                if (std::fabs(bf16_to_f32(wb[i])) > std::fabs(extreme)) extreme = bf16_to_f32(wb[i]);
            const uint16_t d16 = f32_to_f16(std::max(-kF16Max, std::min(kF16Max, extreme / -8.f)));  // saturated
            const float d = f16_to_f32(d16);  // quantize against the scale as stored
            const float id = d != 0.f ? 1.f / d : 0.f;
            uint8_t* out = blocks + (r * nb + g) * Q4::kBlockBytes;
            for (int i = 0; i < Q4::kBlock; i += 2) {
                uint8_t code[2];
                for (int j = 0; j < 2; ++j) {
                    const float q = round_half_even(bf16_to_f32(wb[i + j]) * id) + 8.f;
                    code[j] = uint8_t(std::max(0.f, std::min(15.f, q)));
                }
                out[i / 2] = uint8_t(code[0] | (code[1] << 4));
            }
            scales[r * nb + g] = d16;
        }
    });
}

namespace {
// FP4 magnitudes' midpoints: a value at most the i-th rounds to a code <= i (ties: the even one).
constexpr float kFp4Midpoints[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.f};
}  // namespace

// formats.mxfp4_quantize, row by row on the thread pool: the same float operations (an exact
// exponent, power-of-two scalings, comparisons with the midpoints), so the same bytes.
void mxfp4_quantize(const uint16_t* w, int64_t N, int64_t K, uint8_t* blocks, uint8_t* scales) {
    const int64_t nb = K / Mxfp4::kBlock;
    global_pool().parallel_for(N, [&](int64_t r) {
        for (int64_t g = 0; g < nb; ++g) {
            float v[Mxfp4::kBlock];
            float amax = 0.f;
            for (int i = 0; i < Mxfp4::kBlock; ++i) {
                v[i] = bf16_to_f32(w[r * K + g * Mxfp4::kBlock + i]);
                amax = std::max(amax, std::fabs(v[i]));
            }
            int e = -127;
            if (amax > 0.f) {
                int x;
                std::frexp(amax, &x);  // amax = m * 2^x, m in [0.5, 1)
                e = x - 3;
                if (std::ldexp(amax, -e) > 6.f) ++e;
                e = std::min(std::max(e, -127), 127);
            }
            uint8_t* out = blocks + (r * nb + g) * Mxfp4::kBlockBytes;
            for (int i = 0; i < Mxfp4::kBlock; i += 2) {
                uint8_t code[2];
                for (int j = 0; j < 2; ++j) {
                    const float s = std::ldexp(std::fabs(v[i + j]), -e);
                    int idx = 0;
                    while (idx < 7 && kFp4Midpoints[idx] < s) ++idx;
                    if (idx < 7 && s == kFp4Midpoints[idx] && idx % 2 == 1) ++idx;
                    code[j] = uint8_t(idx | (std::signbit(v[i + j]) && idx > 0 ? 8 : 0));
                }
                out[i / 2] = uint8_t(code[0] | (code[1] << 4));
            }
            scales[r * nb + g] = uint8_t(e + 127);
        }
    });
}

void quant_matmul(const KernelTable& kt, Precision precision, WeightFormat format, const float* x, int64_t T,
                  int64_t K, const uint8_t* values, const uint8_t* scales, int64_t N, float* y) {
    thread_local Scratch scratch_tl;
    thread_local std::vector<int8_t> tile_storage;
    const Activations act(kt, precision, x, T, K, scratch_tl);
    const int64_t nb = K / 32;
    const QuantRows w(kt, format, values, scales, nb);
    std::vector<std::vector<int64_t>> all_rows(1, std::vector<int64_t>(size_t(T)));
    for (int64_t t = 0; t < T; ++t) all_rows[0][size_t(t)] = t;
    const TileGroups tiles(kt, format, act, nb, all_rows, tile_storage);
    const TiledRows tiled = tiles.of(0);
    if (tiled.n > 0)
        dense_tile_rows(N, tiled, [&](int64_t r0, int64_t n, float* res) {
            w.kernels.tile_q16(w.values_of(r0), w.scales_of(r0), nb, n, tiled.groups, tiled.n_groups(), res);
        }, [](int64_t) { return 0.f; }, N, y);
    const int64_t t_rest = tiled.n;
    for_rows_and_token_passes(N, T - t_rest, w.row_bytes(), [&](int64_t r0, int64_t r1, int64_t i0, int cnt) {
        float res[kMaxTokens];
        Q16Row xq[kMaxTokens];
        const float* xf[kMaxTokens];
        for (int j = 0; j < cnt; ++j) {
            if (act.fast()) xq[j] = act.row(t_rest + i0 + j);
            else xf[j] = x + (t_rest + i0 + j) * K;
        }
        for (int64_t r = r0; r < r1; ++r) {
            if (act.fast()) w.kernels.dot_q16(w.values_of(r), w.scales_of(r), nb, xq, cnt, res);
            else w.kernels.dot_f32(w.values_of(r), w.scales_of(r), nb, xf, cnt, res);
            for (int j = 0; j < cnt; ++j) y[(t_rest + i0 + j) * N + r] = res[j];
        }
    });
}

void moe_experts(const KernelTable& kt, Precision precision, const MoeWeights& w, const float* x,
                 int64_t T, const int32_t* ids, int64_t k, float* out) {
    const int64_t E = w.n_experts, H = w.hidden, I = w.inter, A = T * k;
    // Group assignments a = t*k + slot by expert, in increasing a (a fixed order).
    std::vector<std::vector<int64_t>> by_expert(static_cast<size_t>(E));
    for (int64_t a = 0; a < A; ++a) {
        if (ids[a] >= 0) by_expert[size_t(ids[a])].push_back(a);
        else std::fill(out + a * H, out + (a + 1) * H, 0.f);
    }
    std::vector<int64_t> token_of(static_cast<size_t>(A));
    for (int64_t a = 0; a < A; ++a) token_of[size_t(a)] = a / k;

    struct Task { int64_t expert, r0, r1; };
    auto make_tasks = [&](int64_t rows) {
        std::vector<Task> tasks;
        for (int64_t e = 0; e < E; ++e)
            if (!by_expert[size_t(e)].empty())
                for (int64_t r = 0; r < rows; r += kRowsPerTask) tasks.push_back({e, r, std::min(rows, r + kRowsPerTask)});
        return tasks;
    };
    // Runs run(task, r0, r1) over every task's rows. When each expert has at most one pass of
    // tokens (decoding), a row at a time in_two_streams (rows are independent dot products: the
    // order changes no result). Matrix-unit tiles want whole row ranges, and several token passes
    // want a task's rows to stay in L2 between passes: then tasks run whole.
    const bool one_pass = std::all_of(by_expert.begin(), by_expert.end(),
                                      [](const std::vector<int64_t>& as) { return as.size() <= size_t(kMaxTokens); });
    auto run_tasks = [&](const std::vector<Task>& tasks, bool no_tiles, const auto& run) {
        auto task = [&](int64_t i) -> const Task& { return tasks[size_t(i)]; };
        if (one_pass && no_tiles)
            in_two_streams(int64_t(tasks.size()), [&](int64_t i) { return task(i).r1 - task(i).r0; },
                           [&](int64_t i, int64_t j) { run(task(i), task(i).r0 + j, task(i).r0 + j + 1); });
        else
            global_pool().parallel_for(int64_t(tasks.size()), [&](int64_t i) { run(task(i), task(i).r0, task(i).r1); });
    };
    // Gathered token lists: phase 1 reads x[t], phase 2 reads act[a]; both write row a.
    std::vector<std::vector<int64_t>> tokens_by_expert(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
        for (int64_t a : by_expert[size_t(e)]) tokens_by_expert[size_t(e)].push_back(token_of[size_t(a)]);

    const int64_t nb1 = H / 32, nb2 = I / 32;
    const QuantRows gate_up_rows(kt, w.format, w.gate_up_values, w.gate_up_scales, nb1);
    const QuantRows down_rows(kt, w.format, w.down_values, w.down_scales, nb2);
    // This thread's buffers, by reference: a thread_local named inside the lambdas below would be
    // each worker's own, empty one.
    struct MoeScratch {
        Scratch x, act_q;
        std::vector<float> h, act;
        std::vector<int8_t> tiles;
    };
    thread_local MoeScratch scratch_tl;
    MoeScratch& scratch = scratch_tl;
    std::vector<float>& h = scratch.h;
    std::vector<float>& act = scratch.act;
    moemesh::scratch(h, static_cast<size_t>(A * 2 * I));
    // An expert's rows in one projection: r rows from its first.
    auto expert_rows = [](const QuantRows& rows, int64_t first) {
        QuantRows out = rows;
        out.values = rows.values_of(first);
        out.scales = rows.scales_of(first);
        return out;
    };
    {
        Activations xa(kt, precision, x, T, H, scratch.x);
        const TileGroups tiles(kt, w.format, xa, nb1, tokens_by_expert, scratch.tiles);
        run_tasks(make_tasks(2 * I), !tiles.any(), [&](const Task& t, int64_t r0, int64_t r1) {
            const auto& as = by_expert[size_t(t.expert)];
            quant_rows(expert_rows(gate_up_rows, t.expert * 2 * I), w.gate_up_bias ? w.gate_up_bias + t.expert * 2 * I : nullptr,
                       r0, r1, xa, tokens_by_expert[size_t(t.expert)].data(), as.data(), int64_t(as.size()),
                       tiles.of(t.expert), h.data(), 2 * I);
        });
    }
    moemesh::scratch(act, static_cast<size_t>(A * I));
    global_pool().parallel_for(A, [&](int64_t a) {
        if (ids[a] >= 0) swiglu(h.data() + a * 2 * I, I, w, act.data() + a * I);
    });
    {
        Activations aa(kt, precision, act.data(), A, I, scratch.act_q);
        const TileGroups tiles(kt, w.format, aa, nb2, by_expert, scratch.tiles);
        run_tasks(make_tasks(H), !tiles.any(), [&](const Task& t, int64_t r0, int64_t r1) {
            const auto& as = by_expert[size_t(t.expert)];
            quant_rows(expert_rows(down_rows, t.expert * H), w.down_bias ? w.down_bias + t.expert * H : nullptr, r0, r1,
                       aa, as.data(), as.data(), int64_t(as.size()), tiles.of(t.expert), out, H);
        });
    }
}

}  // namespace moemesh

namespace moemesh {
namespace {
// Rows of about this many scores per task: long rows each their own task, short ones grouped.
constexpr int64_t kSoftmaxScoresPerTask = 8192;
}  // namespace

void attention_softmax(const KernelTable& kt, float* scores, int64_t H, int64_t T, int64_t S, const float* sinks,
                       const int64_t* q_pos, const int64_t* k_pos, int64_t window, float sqrt_d) {
    const int64_t rows_per_task = std::max<int64_t>(1, kSoftmaxScoresPerTask / std::max<int64_t>(S, 1));
    const auto softmax_row = kt.softmax_row ? kt.softmax_row : attention::softmax_row;
    for_ranges(H * T, rows_per_task, [&](int64_t row0, int64_t row1) {
        for (int64_t row = row0; row < row1; ++row) {
            float* s = scores + row * S;
            const int64_t qp = q_pos[row % T];
            const float sink = sinks[row / T];
            float m = sink;
            for (int64_t j = 0; j < S; ++j) {
                s[j] = attention::key_visible(k_pos[j], qp, window) ? s[j] / sqrt_d : -INFINITY;
                m = std::max(m, s[j]);
            }
            softmax_row(s, S, sink, m);
        }
    });
}

namespace {
void portable_attend_group(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride,
                           int64_t d, const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window,
                           float sqrt_d, float* scores, float* out) {
    attention::with_head_dim(d, [&](auto D) {
        attention::attend_group<D()>(q, group, k, v, S, stride, sinks, k_pos, q_pos, window, sqrt_d, scores, out);
    });
}
}  // namespace

void attend(const KernelTable& kt, const float* q, int64_t T, int64_t nq, int64_t d, const float* k, const float* v,
            int64_t S, int64_t nkv, const float* sinks, const int64_t* q_pos, const int64_t* k_pos, int64_t window,
            float sqrt_d, float* out) {
    const int group = int(nq / nkv);
    const auto attend_group = kt.attend_group ? kt.attend_group : portable_attend_group;
    // Keys in increasing positions (a full layer's cache, a prompt's first chunk): each query scans
    // only the keys it sees, not the causal future or what left the window.
    const bool in_order = std::adjacent_find(k_pos, k_pos + S, std::greater_equal<int64_t>()) == k_pos + S;
    global_pool().parallel_for(T * nkv, [&](int64_t task) {
        const int64_t t = task / nkv, g = task % nkv, first = t * nq + g * group;
        int64_t lo = 0, hi = S;
        if (in_order) {
            hi = std::upper_bound(k_pos, k_pos + S, q_pos[t]) - k_pos;
            // From a multiple of the softmax's partial sums (the keys before lo add zeros), so the
            // weights do not depend on which keys were skipped (attention::kParts).
            if (window > 0)
                lo = (std::upper_bound(k_pos, k_pos + hi, q_pos[t] - window) - k_pos) / attention::kParts * attention::kParts;
        }
        thread_local std::vector<float> scores;
        moemesh::scratch(scores, size_t(group * std::max<int64_t>(hi - lo, 1)));
        attend_group(q + first * d, group, k + lo * nkv * d + g * d, v + lo * nkv * d + g * d, hi - lo, nkv * d, d,
                     sinks + g * group, k_pos + lo, q_pos[t], window, sqrt_d, scores.data(), out + first * d);
    });
}

void rmsnorm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* out) {
    constexpr int64_t kRmsRowsPerTask = 16;
    for_ranges(T, kRmsRowsPerTask, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const float* xr = x + t * H;
            double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // fixed-order partial sums, vectorizable
            int64_t i = 0;
            for (; i + 8 <= H; i += 8)
                for (int j = 0; j < 8; ++j) part[j] += double(xr[i + j]) * double(xr[i + j]);
            for (; i < H; ++i) part[0] += double(xr[i]) * double(xr[i]);
            const double sum =
                ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            const float denom = std::sqrt(float(sum / double(H)) + eps);
            float* o = out + t * H;
            for (int64_t k = 0; k < H; ++k) o[k] = xr[k] / denom * w[k];
        }
    });
}

void rope_rotate(float* x, int64_t T, int64_t heads, int64_t d, const float* cos, const float* sin) {
    const int64_t half = d / 2;
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int64_t h = 0; h < heads; ++h) {
            float* x1 = x + (t * heads + h) * d;
            float* x2 = x1 + half;
            for (int64_t i = 0; i < half; ++i) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

void router_topk(const float* logits, int64_t T, int64_t E, int64_t k, int32_t* ids, float* weights) {
    std::vector<char> taken(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
        const float* l = logits + t * E;
        int32_t* id = ids + t * k;
        float* w = weights + t * k;
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t s = 0; s < k; ++s) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)  // strictly greater: on a tie the lower id stays
                if (!taken[size_t(e)] && (best < 0 || l[e] > l[best])) best = e;
            taken[size_t(best)] = 1;
            id[s] = int32_t(best);
        }
        float sum = 0.f;
        for (int64_t s = 0; s < k; ++s) sum += w[s] = std::exp(l[id[s]] - l[id[0]]);
        for (int64_t s = 0; s < k; ++s) w[s] /= sum;
    }
}

void add_experts(const float* x, const float* outputs, const float* weights, int64_t T, int64_t k, int64_t H,
                 float* out) {
    // A token's row accumulates one expert at a time (unit-stride loops the compiler vectorises),
    // each element through the same operations in the same order as the reference: o0 w0, then
    // + os ws for s = 1 .. k-1, then x +. Tokens in parallel: a prefill's 512 x 8 x 2048 was 4 ms.
    constexpr int64_t kTokensPerTask = 16;
    for_ranges(T, kTokensPerTask, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const float* o = outputs + t * k * H;
            const float* w = weights + t * k;
            float* y = out + t * H;
            for (int64_t i = 0; i < H; ++i) y[i] = o[i] * w[0];
            for (int64_t s = 1; s < k; ++s)
                for (int64_t i = 0; i < H; ++i) y[i] = y[i] + o[s * H + i] * w[s];
            for (int64_t i = 0; i < H; ++i) y[i] = x[t * H + i] + y[i];
        }
    });
}

uint64_t stream_read(const uint8_t* buf, int64_t n_bytes, bool prefetch) {
    constexpr int64_t kChunk = 1 << 20;
    const int64_t n_chunks = (n_bytes + kChunk - 1) / kChunk;
    std::vector<uint64_t> partial(static_cast<size_t>(n_chunks), 0);
    global_pool().parallel_for(n_chunks, [&](int64_t c) {
        const int64_t end = std::min(n_bytes, (c + 1) * kChunk) / 8 * 8;
        uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = c * kChunk;
        // One cache line per step, with prefetches as far ahead as the kernels issue them, or none.
        for (; i + 64 <= end; i += 64) {
            if (prefetch) {
                __builtin_prefetch(buf + i + kPrefetchFarBytes, 0, 2);
                __builtin_prefetch(buf + i + kPrefetchBytes, 0, 3);
            }
            for (int j = 0; j < 8; ++j) {
                uint64_t v;
                std::memcpy(&v, buf + i + 8 * j, 8);
                acc[j] ^= v;
            }
        }
        for (; i + 8 <= end; i += 8) {
            uint64_t v;
            std::memcpy(&v, buf + i, 8);
            acc[0] ^= v;
        }
        partial[static_cast<size_t>(c)] = acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
    });
    uint64_t x = 0;
    for (uint64_t p : partial) x ^= p;
    return x;
}

void stream_triad(float* a, const float* b, const float* c, float scalar, int64_t n) {
    constexpr int64_t kChunk = 1 << 18;
    global_pool().parallel_for((n + kChunk - 1) / kChunk, [&](int64_t k) {
        const int64_t end = std::min(n, (k + 1) * kChunk);
        for (int64_t i = k * kChunk; i < end; ++i) a[i] = b[i] + scalar * c[i];
    });
}
}  // namespace moemesh
