// AVX-512 kernels (F/BW/VL + VNNI; compiled with those flags, selected only when the CPU has them).
// Built twice: with MOEMESH_VBMI the MXFP4 nibble lookup uses VBMI's vpermb (same results).
// fp32 path: a block's 32 weights are two zmm registers. Fast path: 16 blocks' weights in eight zmm
// of offset bytes and 8-bit VNNI (vpdpbusd) against activation codes split into bytes.
#include <immintrin.h>

#include <type_traits>

#include "attention.h"
#include "avx512_layout.h"
#include "fma_tiles.h"
#include "formats.h"
#include "kernels.h"
#include "kernels_amx.h"
#include "x86_common.h"

namespace moemesh {
namespace {

// Fixed-order horizontal sum of 16 lanes: fold the halves, then the 8-lane AVX sum.
inline float hsum512(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return x86::hsum256(_mm256_add_ps(lo, hi));
}

template <typename Format>
void blocks_dot_f32(const uint8_t* blocks, const uint8_t* scale_bytes, int64_t n_blocks, const float* const* x,
                     int n_tok, float* out) {
    const auto* scales = reinterpret_cast<const typename Format::Scale*>(scale_bytes);
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Format::kBlockBytes);
        x86::decode_block_i8<Format>(blocks + g * Format::kBlockBytes, &e0, &e1);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e0));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e1));
        const __m512 sc = _mm512_set1_ps(Format::int_scale(scales[g]));
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Format::kBlock;
            const __m512 s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
            acc[t] = _mm512_fmadd_ps(s, sc, acc[t]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum512(acc[t]);
}

// The fast path on 8-bit VNNI (vpdpbusd: 64 u8 x s8 products per instruction, twice int16's rate
// and no widening of the weights), in the layout of avx512_layout.h.
//
// In every register of a chunk the 32-bit lane k belongs to block k: a block's products all land
// in one int32 lane, so one convert and one FMA with the 16 blocks' scales finish a chunk (per
// 4-block group, as before, that work equalled the multiplies themselves). The weights are 8 byte
// planes W[2c + e] matching the activations' planes; MXFP4 codes get there with a dword transpose
// (code byte 4c + m of a block holds elements 8c + 2m and + 1 in its nibbles), the Q8 copy is
// stored that way. A short chunk's planes are read with masks.
using avx512::kChunk;
using avx512::plane_byte;

// The first `bytes` of 64 (all of them at 64).
inline __mmask64 bytes_mask(int bytes) { return bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1; }
// The first n of 16 lanes (all of them from 16 on).
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
// A short chunk's n lanes of 4 bytes.
inline __mmask64 lanes_mask(int n) { return bytes_mask(4 * n); }

void activation_layout(int16_t* q, int64_t n_blocks) { planes::activation_layout<kChunk>(q, n_blocks); }
void q8_weight_layout(uint8_t* w, int64_t n_blocks) {
    planes::q8_weight_layout<kChunk, 128>(reinterpret_cast<int8_t*>(w), n_blocks);
}

// The dword picks of the MXFP4 transpose, built at compile time (with the nibble table built per
// call, they cost ~100 cycles a row).
struct alignas(64) Mxfp4Picks {
    int32_t pick01[16];         // from two 4-block registers: lanes 0-7 dword c of each block, 8-15 dword c+1
    int32_t pick23[16];         // the same for dwords 2 and 3
    constexpr Mxfp4Picks() : pick01{}, pick23{} {
        for (int lane = 0; lane < 16; ++lane) {
            const int c = lane / 8, pos = lane % 8, src = (pos / 4) * 16 + 4 * (pos % 4);
            pick01[lane] = src + c;
            pick23[lane] = src + c + 2;
        }
    }
};
constexpr Mxfp4Picks kMxfp4Picks{};

// Rows of a 4-bit format (MXFP4, Q4): 4 loads of 4 blocks, a dword transpose (register c, lane k
// = code bytes 4c..4c+3 of block k), then a nibble lookup in each 128-bit lane gives offset bytes
// (Q4's offset bytes are its codes: no lookup).
template <typename Format>
struct NibbleRow {
    static constexpr bool kCodesAreBytes = std::is_same_v<Format, Q4>;
    // The offset's share comes out in int32, leaving each block's exact sum of integers times
    // codes (|sum| <= 32 * 12 * 32639 < 2^24, so the convert is exact too): the AMX tiles reach
    // the same float by multiplying bf16 integers (kernels_amx.cpp).
    static __m512 block_sums(__m512i p, __m512i code_sums) {
        static_assert(Format::kIntOffset == 12 || Format::kIntOffset == 8, "the share is 8 s (+ 4 s)");
        __m512i share = _mm512_slli_epi32(code_sums, 3);
        if constexpr (Format::kIntOffset == 12) share = _mm512_add_epi32(share, _mm512_slli_epi32(code_sums, 2));
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(p, share));
    }
    const uint8_t* blocks;
    const uint8_t* scales;
    __m512i table, pick01, pick23;

    NibbleRow(const uint8_t* b, const uint8_t* s)
        : blocks(b), scales(s), table(_mm512_load_si512(avx512::kOffsetBytes<Format>.values)),
          pick01(_mm512_load_si512(kMxfp4Picks.pick01)), pick23(_mm512_load_si512(kMxfp4Picks.pick23)) {}
    __m512 scales16(int n, int64_t g0) const {
        // The scale stream runs 16x (8x) slower than the codes: the same lead in time is 1/16 the bytes.
        _mm_prefetch(reinterpret_cast<const char*>(scales) + g0 * Format::kScaleBytes +
                         kPrefetchFarBytes * Format::kScaleBytes / 16, _MM_HINT_T0);
        if constexpr (std::is_same_v<Format, Mxfp4>) return avx512::half_scales16(n, scales + g0);
        else return avx512::f16_scales16(n, reinterpret_cast<const uint16_t*>(scales) + g0);
    }
    template <bool kFull>
    void chunk(int64_t g0, int n, __m512i w[8]) const {
        const uint8_t* codes = blocks + g0 * Format::kBlockBytes;
        __m512i a[4];
        for (int j = 0; j < 4; ++j) {
            x86::prefetch_ahead(codes + 64 * j);
            const int in_reg = n - 4 * j < 0 ? 0 : n - 4 * j;  // blocks of a short chunk in register j
            a[j] = kFull ? _mm512_loadu_si512(codes + 64 * j)
                         : _mm512_maskz_loadu_epi8(bytes_mask(Format::kBlockBytes * in_reg), codes + 64 * j);
        }
        const __m512i p01 = _mm512_permutex2var_epi32(a[0], pick01, a[1]), p23 = _mm512_permutex2var_epi32(a[0], pick23, a[1]);
        const __m512i q01 = _mm512_permutex2var_epi32(a[2], pick01, a[3]), q23 = _mm512_permutex2var_epi32(a[2], pick23, a[3]);
        const __m512i r[4] = {_mm512_shuffle_i64x2(p01, q01, 0x44), _mm512_shuffle_i64x2(p01, q01, 0xEE),
                              _mm512_shuffle_i64x2(p23, q23, 0x44), _mm512_shuffle_i64x2(p23, q23, 0xEE)};
        const __m512i low = _mm512_set1_epi8(0x0F);
        if constexpr (kCodesAreBytes) {
            for (int c = 0; c < 4; ++c) {
                w[2 * c] = _mm512_and_si512(r[c], low);
                w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(r[c], 4), low);
            }
            return;
        }
#if defined(MOEMESH_VBMI)
        // vpermb reads 6 index bits: the table repeats every 16 entries, so no masking.
        for (int c = 0; c < 4; ++c) {
            w[2 * c] = _mm512_permutexvar_epi8(r[c], table);
            w[2 * c + 1] = _mm512_permutexvar_epi8(_mm512_srli_epi16(r[c], 4), table);
        }
#else
        for (int c = 0; c < 4; ++c) {
            w[2 * c] = _mm512_shuffle_epi8(table, _mm512_and_si512(r[c], low));
            w[2 * c + 1] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(r[c], 4), low));
        }
#endif
    }
};

// Q8 rows: the copy holds the 8 planes of each chunk as they are used.
struct Q8Row {
    // Q8 sums can pass 2^24 (32 * 127 * 32639), so they are floats before the offset's share goes.
    static __m512 block_sums(__m512i p, __m512i code_sums) {
        return _mm512_fnmadd_ps(_mm512_set1_ps(128.f), _mm512_cvtepi32_ps(code_sums), _mm512_cvtepi32_ps(p));
    }
    const int8_t* values;
    const uint16_t* scales;

    __m512 scales16(int n, int64_t g0) const { return avx512::f16_scales16(n, scales + g0); }
    template <bool kFull>
    void chunk(int64_t g0, int n, __m512i w[8]) const {
        const int8_t* v = values + g0 * Q8::kBlock;
        for (int p = 0; p < 8; ++p) {
            x86::prefetch_ahead(v + 64 * p);
            w[p] = kFull ? _mm512_loadu_si512(v + 64 * p) : _mm512_maskz_loadu_epi8(lanes_mask(n), v + 4 * n * p);
        }
    }
};

// One chunk against one token: int32 sums per block, lane k = block k.
template <bool kFull>
inline __m512i chunk_dot(const __m512i w[8], const int8_t* planes, int n) {
    auto plane = [&](int p) {
        const int8_t* src = planes + p * 4 * n;
        return kFull ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(lanes_mask(n), src);
    };
    __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
    for (int p = 0; p < 8; ++p) {
        hi = _mm512_dpbusd_epi32(hi, w[p], plane(p));
        lo = _mm512_dpbusd_epi32(lo, w[p], plane(8 + p));
    }
    return _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
}

// Per chunk and token: the offset's share out (Row::block_sums), one FMA with the blocks' combined
// scales. NT is a template parameter so every token's accumulator stays in a register.
template <int NT, typename Row>
void dot_q16_n(const Row& row, int64_t n_blocks, const Q16Row* x, float* out) {
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    auto step = [&](auto full, int64_t g0, int n) {
        constexpr bool kFull = decltype(full)::value;
        const __mmask16 m = first_lanes(n);
        const __m512 ws = row.scales16(n, g0);
        __m512i w[8];
        row.template chunk<kFull>(g0, n, w);
        for (int t = 0; t < NT; ++t) {
            const __m512 csv = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(m, x[t].d + g0));
            const __m512i p = chunk_dot<kFull>(w, reinterpret_cast<const int8_t*>(x[t].q + g0 * 32), n);
            const __m512 sums = Row::block_sums(p, _mm512_maskz_loadu_epi32(m, x[t].s + g0));
            acc[t] = _mm512_fmadd_ps(sums, csv, acc[t]);
        }
    };
    int64_t g0 = 0;
    for (; g0 + kChunk <= n_blocks; g0 += kChunk) step(std::true_type{}, g0, kChunk);
    if (g0 < n_blocks) step(std::false_type{}, g0, int(n_blocks - g0));
    for (int t = 0; t < NT; ++t) out[t] = hsum512(acc[t]);
}

template <typename Format>
void nibbles_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                     float* out) {
    const NibbleRow<Format> row(blocks, scales);
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

void q8_dot_q16(const uint8_t* w, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok, float* out) {
    const Q8Row row{reinterpret_cast<const int8_t*>(w), reinterpret_cast<const uint16_t*>(scales)};
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

// Weights 32 at a time: one load of 32 bf16, whose even elements become fp32 with a shift and odd
// ones with a mask (activations come in that order, bf16_activation_layout), each half with its own
// accumulator. NT is a template parameter so all accumulators stay in registers. (One widening per
// 16 weights and one accumulator per token in memory ran at half the FMA units' rate: prefill
// q/k/v/o 68 GFLOP/s.) NR rows w, w + n, ... share each activation load: one row at a time, loads
// bound the loop from 3 tokens on (the unembedding at 4 tokens: 66 ms one row at a time, 59 in
// pairs, 43 at 1 token). Each row's sums are the same operations in the same order for any NR.
template <int NT, int NR>
void bf16_dot_rows(const uint16_t* w, int64_t n, const float* const* x, float* out) {
    __m512 even[NR][NT], odd[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) even[r][t] = odd[r][t] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 we[NR], wo[NR];
        for (int r = 0; r < NR; ++r) {
            // Stream ahead: hardware prefetchers stop at 4 KiB page edges of the mapped checkpoint.
            // NR rows stream at once, each 1/NR as fast: NR times the bytes keep the far lead's
            // time (pairs at 4 tokens: 16 KiB 51-53 ms, 8 KiB 52-60).
            const char* at = reinterpret_cast<const char*>(w + r * n + i);
            _mm_prefetch(at + kPrefetchBytes, _MM_HINT_T0);
            _mm_prefetch(at + NR * kPrefetchFarBytes, _MM_HINT_T1);
            __m512i v = _mm512_loadu_si512(w + r * n + i);
            asm("" : "+v"(v));  // one load for both halves (else folded into each)
            we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for (int t = 0; t < NT; ++t) {
            __m512 xe = _mm512_loadu_ps(x[t] + i), xo = _mm512_loadu_ps(x[t] + i + 16);
            asm("" : "+v"(xe), "+v"(xo));  // one load for all rows (else folded into every FMA)
            for (int r = 0; r < NR; ++r) {
                even[r][t] = _mm512_fmadd_ps(we[r], xe, even[r][t]);
                odd[r][t] = _mm512_fmadd_ps(wo[r], xo, odd[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) {
            float s = hsum512(_mm512_add_ps(even[r][t], odd[r][t]));
            for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[r * n + j]) * x[t][j];
            out[r * NT + t] = s;
        }
}

template <int NT>
void bf16_rows_n(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, float* out) {
    int64_t r = 0;
    for (; r + 2 <= n_rows; r += 2) bf16_dot_rows<NT, 2>(w + r * n, n, x, out + r * NT);
    if (r < n_rows) bf16_dot_rows<NT, 1>(w + r * n, n, x, out + r * NT);
}

void bf16_activation_layout(float* x, int64_t n) { x86::even_odd_layout<32>(x, n); }

void bf16_dot_f32(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, int n_tok, float* out) {
    with_token_count(n_tok, [&](auto nt) { bf16_rows_n<decltype(nt)::value>(w, n_rows, n, x, out); });
}

// attention.h's attention with 16 lanes: the same float operations in the same order, so the same
// bits as the portable code.

inline __m512 exp_nonpositive16(__m512 x) {
    auto k = [](float v) { return _mm512_set1_ps(v); };
    const __m512 xc = _mm512_max_ps(k(-87.f), x);  // NaN stays NaN, as std::max(x, -87.f)
    const __m512 magic = k(12582912.f);              // round_half_even
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, k(1.44269504f)), magic), magic);
    const __m512 r =
        _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(n, k(0.693145752f))), _mm512_mul_ps(n, k(1.42860677e-6f)));
    __m512 p = k(1.38888889e-3f);
    for (float c : {8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f, 0.5f, 1.f, 1.f})
        p = _mm512_add_ps(_mm512_mul_ps(p, r), k(c));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __mmask16 under = _mm512_cmp_ps_mask(x, k(-87.3f), _CMP_LT_OQ);
    return _mm512_maskz_mul_ps(__mmask16(~under), p, _mm512_castsi512_ps(bits));
}

void softmax_row(float* s, int64_t S, float sink, float m) {
    __m256 part = _mm256_setzero_ps();  // partial sum i takes elements j with j % 8 == i
    const __m512 mv = _mm512_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        const bool two = j + 16 <= S;
        const __mmask16 lanes = two ? __mmask16(0xFFFF) : __mmask16(0xFF);
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), mv));
        _mm512_mask_storeu_ps(s + j, lanes, e);
        part = _mm256_add_ps(part, _mm512_castps512_ps256(e));
        if (two) {
            part = _mm256_add_ps(part, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
            j += 8;
        }
    }
    alignas(32) float parts[8];
    _mm256_store_ps(parts, part);
    for (; j < S; ++j) parts[j % attention::kParts] += s[j] = attention::exp_nonpositive(s[j] - m);
    const __m512 z = _mm512_set1_ps(attention::softmax_denominator(parts, sink, m));
    for (int64_t i = 0; i < S; i += 16) {
        const __mmask16 lanes = first_lanes(S - i);
        _mm512_mask_storeu_ps(s + i, lanes, _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, s + i), z));
    }
}

// Keys (and values) fetched ahead: a kv head's rows are a stride apart, which the hardware
// prefetchers do not follow.
constexpr int64_t kKeysAhead = 16;

inline void prefetch_row(const float* row) {
    _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
}

// Raw scores q_h . k_j of keys [j0, j0 + 16) (fewer at the end) for every head: the keys' rows are
// transposed 16 floats at a time, so lane j of a head's sum adds q[d] k_j[d] over d in order.
template <int D>
void score_block(const float* q, int group, const float* k, int64_t j0, int n, int64_t S, int64_t stride,
                 uint32_t visible, float* scores) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __mmask16 lanes = first_lanes(n);
    if (!visible) {
        for (int h = 0; h < group; ++h) _mm512_mask_storeu_ps(scores + h * S + j0, lanes, minus_inf);
        return;
    }
    alignas(64) float sums[attention::kMaxGroup][16] = {};
    for (int r = 0; r < D / 16; ++r) {
        __m512 kt[16];
        for (int j = 0; j < 16; ++j) {
            if (j0 + kKeysAhead + j < S) prefetch_row(k + (j0 + kKeysAhead + j) * stride + 16 * r);
            kt[j] = j < n ? _mm512_loadu_ps(k + (j0 + j) * stride + 16 * r) : _mm512_setzero_ps();
        }
        avx512::transpose16(kt);  // kt[i] lane j = k_{j0 + j}[16 r + i]
        for (int h = 0; h < group; ++h) {
            const float* qh = q + h * D + 16 * r;
            __m512 acc = _mm512_load_ps(sums[h]);
            for (int i = 0; i < 16; ++i) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(qh[i]), kt[i]));
            _mm512_store_ps(sums[h], acc);
        }
    }
    for (int h = 0; h < group; ++h)
        _mm512_mask_storeu_ps(scores + h * S + j0, lanes,
                              _mm512_mask_blend_ps(__mmask16(visible), minus_inf, _mm512_load_ps(sums[h])));
}

// out[h] += p_hj v_j over the visible keys in order, for HN heads whose accumulators stay in registers.
template <int D, int HN>
void weigh_values(const float* v, int64_t S, int64_t stride, const int64_t* k_pos, int64_t q_pos, int64_t window,
                  const float* scores, float* out) {
    constexpr int R = D / 16;
    __m512 acc[HN * R];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
        if (!attention::key_visible(k_pos[j], q_pos, window)) continue;
        __m512 vj[R];
        for (int r = 0; r < R; ++r) {
            if (j + kKeysAhead < S) prefetch_row(v + (j + kKeysAhead) * stride + 16 * r);
            vj[r] = _mm512_loadu_ps(v + j * stride + 16 * r);
        }
        for (int h = 0; h < HN; ++h) {
            const __m512 p = _mm512_set1_ps(scores[h * S + j]);
            for (int r = 0; r < R; ++r) acc[h * R + r] = _mm512_add_ps(acc[h * R + r], _mm512_mul_ps(p, vj[r]));
        }
    }
    for (int h = 0; h < HN; ++h)
        for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + h * D + 16 * r, acc[h * R + r]);
}

template <int D>
void attend_group_n(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride,
                    const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window, float sqrt_d,
                    float* scores, float* out) {
    for (int64_t j0 = 0; j0 < S; j0 += 16) {
        const int n = int(std::min<int64_t>(16, S - j0));
        uint32_t visible = 0;
        for (int j = 0; j < n; ++j) visible |= uint32_t(attention::key_visible(k_pos[j0 + j], q_pos, window)) << j;
        score_block<D>(q, group, k, j0, n, S, stride, visible, scores);
    }
    // Then per head, 16 scores at a time: / sqrt_d (-inf stays -inf) and the max with the sink
    // (exact whatever the order; a NaN score is passed over, as std::max passes it).
    const __m512 root = _mm512_set1_ps(sqrt_d), minus_inf = _mm512_set1_ps(-INFINITY);
    for (int h = 0; h < group; ++h) {
        float* sh = scores + h * S;
        __m512 mv = _mm512_set1_ps(sinks[h]);
        for (int64_t i = 0; i < S; i += 16) {
            const __mmask16 lanes = first_lanes(S - i);
            const __m512 sv = _mm512_div_ps(_mm512_mask_loadu_ps(minus_inf, lanes, sh + i), root);
            _mm512_mask_storeu_ps(sh + i, lanes, sv);
            mv = _mm512_max_ps(sv, mv);
        }
        softmax_row(sh, S, sinks[h], _mm512_reduce_max_ps(mv));
    }
    // Accumulators for as many heads as 16 registers hold.
    constexpr int kHeads = D >= 256 ? 1 : 256 / D;
    int h = 0;
    for (; h + kHeads <= group; h += kHeads)
        weigh_values<D, kHeads>(v, S, stride, k_pos, q_pos, window, scores + h * S, out + h * D);
    for (; h < group; ++h) weigh_values<D, 1>(v, S, stride, k_pos, q_pos, window, scores + h * S, out + h * D);
}

void attend_group(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride, int64_t d,
                  const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window, float sqrt_d,
                  float* scores, float* out) {
    attention::with_head_dim(d, [&](auto D) {
        attend_group_n<D()>(q, group, k, v, S, stride, sinks, k_pos, q_pos, window, sqrt_d, scores, out);
    });
}

// fma_tiles' lanes (the bf16 prefill of CPUs without AMX, Zen 4's among them): 16 rows per
// register, 2 x 8 accumulators of the 32 registers. (Zen 4's vdpbf16ps multiplies bf16 by bf16:
// exact fp32 products need the activations split into three bf16 parts as the AMX path does,
// three instructions per pair of elements where the widened-weight FMA needs two.)
struct TileLanes {
    static constexpr int kLanes = 16, kTokens = 8;
    using F = __m512;
    static F zero() { return _mm512_setzero_ps(); }
    static __m512i words(const uint32_t* p) { return _mm512_loadu_si512(p); }
    static F even_elements(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(words(p), 16)); }
    static F odd_elements(const uint32_t* p) {
        return _mm512_castsi512_ps(_mm512_and_si512(words(p), _mm512_set1_epi32(int(0xFFFF0000u))));
    }
    static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static void store(float* p, F v) { _mm512_store_ps(p, v); }
};

void bf16_tile_f32(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    fma_tiles::tile_f32<TileLanes>(w, K, n_rows, packed, n_groups, out);
}

}  // namespace

#if defined(MOEMESH_VBMI)
const KernelTable kAvx512VbmiKernels =
#else
const KernelTable kAvx512Kernels =
#endif
    {"avx512",
     {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, nullptr},
      {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, nullptr},
      {blocks_dot_f32<Q8>, q8_dot_q16, q8_weight_layout, nullptr}},
     activation_layout,
     bf16_dot_f32,
     bf16_activation_layout,
     softmax_row,
     attend_group,
     nullptr,
     nullptr,
     fma_tiles::tile_bytes,
     fma_tiles::tile_pack,
     bf16_tile_f32};

#if defined(MOEMESH_VBMI) && defined(MOEMESH_AMX)
const KernelTable kAvx512AmxKernels = {
    "avx512",
    {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, amx::mxfp4_tile_q16},
     {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, amx::q4_tile_q16},
     {blocks_dot_f32<Q8>, q8_dot_q16, q8_weight_layout, amx::q8_tile_q16}},
    activation_layout,
    bf16_dot_f32,
    bf16_activation_layout,
    softmax_row,
    attend_group,
    amx::tile_group_bytes,
    amx::tile_pack,
    amx::bf16_tile_bytes,
    amx::bf16_tile_pack,
    amx::bf16_tile_f32};
#endif

}  // namespace moemesh
