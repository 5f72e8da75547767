// AVX2 + FMA kernels (-mavx2 -mfma -mf16c; selected only when the CPU has them), the path of most
// laptops. Built twice: with MOEMESH_AVXVNNI the 8-bit dot products are AVX-VNNI's vpdpbusd (Alder
// Lake and later), without it vpmaddubsw + vpmaddwd (Haswell and later); both give the same bits.
//
// The fast path is the AVX-512 one at half width, in byte_planes.h's layout with chunks of 8
// blocks: 32-bit lane k of every register belongs to block k, so the weights of a chunk are
// decoded once for every token, a block's products sum vertically, and one convert and one FMA
// per token finish 8 blocks. (The first AVX2 path widened each block to int16 and did a scalar
// scale and a broadcast per block and token: 3.7 GB/s expert decode, llama.cpp 10.3.)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "attention.h"
#include "byte_planes.h"
#include "fma_tiles.h"
#include "formats.h"
#include "kernels.h"
#include "x86_common.h"

namespace moemesh {
namespace avx2 {
namespace {

constexpr int kChunk = 8;

// Lanes [0, n) of 8 as a mask for maskload (all of them from 8 on).
inline __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 32 bytes, or the first n dwords of them (the rest zero, nothing past them read).
template <bool kFull>
inline __m256i load_lanes(const void* src, int n) {
    return kFull ? _mm256_loadu_si256(static_cast<const __m256i*>(src))
                 : _mm256_maskload_epi32(static_cast<const int*>(src), first_lanes(n));
}

// Weight bytes (unsigned) times one token's activation planes (signed bytes), 8 planes each for hi
// and lo: per lane the block's exact sum, hi * 256 + lo. Without VNNI, vpmaddubsw's 16-bit pairs
// of MXFP4 offset bytes (<= 24) are at most 2 * 24 * 128 = 6144, so four planes add in 16 bits.
template <bool kFull>
inline __m256i chunk_dot_offset(const __m256i w[8], const int8_t* planes, int n) {
    auto plane = [&](int p) { return load_lanes<kFull>(planes + p * 4 * n, n); };
#if defined(MOEMESH_AVXVNNI)
    // Four independent chains: one chain of 8 vpdpbusd (5 cycles each) per half made the latency,
    // not the ports, the limit (expert decode 9.4 GB/s on one core, the same with cached weights).
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int p = 0; p < 8; p += 2)
        for (int j = 0; j < 2; ++j) {
            acc[j] = _mm256_dpbusd_avx_epi32(acc[j], w[p + j], plane(p + j));
            acc[2 + j] = _mm256_dpbusd_avx_epi32(acc[2 + j], w[p + j], plane(8 + p + j));
        }
    const __m256i hi = _mm256_add_epi32(acc[0], acc[1]), lo = _mm256_add_epi32(acc[2], acc[3]);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    auto quad = [&](int first) {  // planes first .. first + 3 of the weights' p = first % 8 ..
        __m256i s = _mm256_maddubs_epi16(w[first % 8], plane(first));
        for (int p = 1; p < 4; ++p) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[(first + p) % 8], plane(first + p)));
        return _mm256_madd_epi16(s, ones);
    };
    const __m256i hi = _mm256_add_epi32(quad(0), quad(4)), lo = _mm256_add_epi32(quad(8), quad(12));
#endif
    return _mm256_add_epi32(_mm256_slli_epi32(hi, 8), lo);
}

// The first n of 8 scale bytes (nothing past them read), zero-extended to 32-bit lanes.
template <bool kFull>
inline __m256i scale_bytes8(const uint8_t* s, int n) {
    uint64_t bytes = 0;
    if (kFull) std::memcpy(&bytes, s, 8);
    else
        for (int k = 0; k < n; ++k) bytes |= uint64_t(s[k]) << (8 * k);
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(bytes)));
}

// 8 blocks' MXFP4 scales -> 2^(s-127) as floats: s << 23, except s = 0, the denormal 2^-127
// (bits 0x00400000, which the unsigned max leaves only to s = 0). The halving of the doubled
// weights is left to the row's end (exact: a power of two). Lanes past n are exact zeros: a
// denormal there would cost an Intel core a microcode assist per operand.
template <bool kFull>
inline __m256 scales8(const uint8_t* s, int n) {
    const __m256i e = scale_bytes8<kFull>(s, n);
    __m256i bits = _mm256_max_epu32(_mm256_slli_epi32(e, 23), _mm256_set1_epi32(0x00400000));
    if (!kFull) bits = _mm256_and_si256(bits, first_lanes(n));
    return _mm256_castsi256_ps(bits);
}

// fp16 scales of the first n of 8 blocks (Q4, Q8; nothing past them read), as floats.
template <bool kFull>
inline __m256 f16_scales8(const uint16_t* s, int n) {
    if (kFull) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
    alignas(16) uint16_t tail[kChunk] = {};
    for (int k = 0; k < n; ++k) tail[k] = s[k];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}

// Rows of a 4-bit format (MXFP4, Q4): blocks k and k + 4 of a chunk share a register (a 128-bit
// half each), two dword unpacks then give register c lane k = code bytes 4c .. 4c + 3 of block k,
// and a nibble lookup in each half gives the offset bytes of weight planes 2c (low nibbles) and
// 2c + 1 (high); Q4's offset bytes are its codes, so it needs no lookup.
template <typename Format>
struct NibbleRow {
    static constexpr bool kCodesAreBytes = std::is_same_v<Format, Q4>;
    // Each block's exact sum of integers times codes (|sum| <= 32 * 12 * 32639 < 2^24, so the
    // convert is exact), with the offset's share, kIntOffset * (sum of codes), taken back out.
    static __m256 block_sums(__m256i p, __m256i code_sums) {
        static_assert(Format::kIntOffset == 12 || Format::kIntOffset == 8, "the share is 8 s (+ 4 s)");
        __m256i share = _mm256_slli_epi32(code_sums, 3);
        if constexpr (Format::kIntOffset == 12) share = _mm256_add_epi32(share, _mm256_slli_epi32(code_sums, 2));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(p, share));
    }
    template <bool kFull>
    static __m256i dot(const __m256i w[8], const int8_t* planes, int n) {
        return chunk_dot_offset<kFull>(w, planes, n);
    }
    const uint8_t* blocks;
    const uint8_t* scales;

    // MXFP4's doubled integers: their factor 2 is taken out once per row.
    static constexpr float kRowFactor = std::is_same_v<Format, Mxfp4> ? 0.5f : 1.f;
    template <bool kFull>
    __m256 scales8(int n, int64_t g0) const {
        // The scale stream runs 16x (8x) slower than the codes: the same lead in time is 1/16 the bytes.
        _mm_prefetch(reinterpret_cast<const char*>(scales) + g0 * Format::kScaleBytes +
                         kPrefetchFarBytes * Format::kScaleBytes / 16, _MM_HINT_T0);
        if constexpr (std::is_same_v<Format, Mxfp4>) return avx2::scales8<kFull>(scales + g0, n);
        else return f16_scales8<kFull>(reinterpret_cast<const uint16_t*>(scales) + g0, n);
    }
    template <bool kFull>
    void chunk(int64_t g0, int n, __m256i w[8]) const {
        const __m128i* codes = reinterpret_cast<const __m128i*>(blocks + g0 * Format::kBlockBytes);
        x86::prefetch_ahead(codes);
        x86::prefetch_ahead(codes + 4);
        auto block = [&](int k) {  // a row's short last chunk reads zeros past its n blocks
            return kFull ? _mm_loadu_si128(codes + k) : _mm_maskload_epi32(reinterpret_cast<const int*>(codes + k),
                                                                            _mm_set1_epi32(k < n ? -1 : 0));
        };
        auto pair = [&](int k) {  // blocks k and k + 4
            return _mm256_inserti128_si256(_mm256_castsi128_si256(block(k)), block(k + 4), 1);
        };
        const __m256i a0 = pair(0), a1 = pair(1), a2 = pair(2), a3 = pair(3);
        const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpackhi_epi32(a0, a1);
        const __m256i t2 = _mm256_unpacklo_epi32(a2, a3), t3 = _mm256_unpackhi_epi32(a2, a3);
        const __m256i r[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                              _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        const __m256i table = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes::kOffsetBytes<Format>.values));
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (int c = 0; c < 4; ++c) {
            const __m256i lo = _mm256_and_si256(r[c], low), hi = _mm256_and_si256(_mm256_srli_epi16(r[c], 4), low);
            w[2 * c] = kCodesAreBytes ? lo : _mm256_shuffle_epi8(table, lo);
            w[2 * c + 1] = kCodesAreBytes ? hi : _mm256_shuffle_epi8(table, hi);
        }
    }
};

// Q8 rows: the copy holds a chunk's 8 weight planes as they are used. With VNNI they are offset
// bytes (value + 128) like the AVX-512 copy's; vpmaddubsw's 16-bit pairs would overflow on those,
// so without VNNI they stay signed and the sign moves to the activations: |x| * (w * sign x), at
// most 2 * 128 * 127 = 32512 a pair.
struct Q8Row {
#if defined(MOEMESH_AVXVNNI)
    static constexpr int kOffset = 128;
    // The share comes out in int32 (|p| <= 32 * 255 * 32639 < 2^31), so both builds convert the
    // same exact sum.
    static __m256 block_sums(__m256i p, __m256i code_sums) {
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_slli_epi32(code_sums, 7)));
    }
    template <bool kFull>
    static __m256i dot(const __m256i w[8], const int8_t* planes, int n) {
        return chunk_dot_offset<kFull>(w, planes, n);
    }
#else
    static constexpr int kOffset = 0;
    static __m256 block_sums(__m256i p, __m256i) { return _mm256_cvtepi32_ps(p); }
    template <bool kFull>
    static __m256i dot(const __m256i w[8], const int8_t* planes, int n) {
        const __m256i ones = _mm256_set1_epi16(1);
        auto half = [&](int first) {
            __m256i s = _mm256_setzero_si256();
            for (int p = 0; p < 8; ++p) {
                const __m256i x = load_lanes<kFull>(planes + (first + p) * 4 * n, n);
                const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w[p], x));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
            }
            return s;
        };
        return _mm256_add_epi32(_mm256_slli_epi32(half(0), 8), half(8));
    }
#endif
    const int8_t* values;
    const uint16_t* scales;

    static constexpr float kRowFactor = 1.f;
    template <bool kFull>
    __m256 scales8(int n, int64_t g0) const { return f16_scales8<kFull>(scales + g0, n); }
    template <bool kFull>
    void chunk(int64_t g0, int n, __m256i w[8]) const {
        const int8_t* v = values + g0 * Q8::kBlock;
        for (int p = 0; p < 8; ++p) {
            if (p % 2 == 0) x86::prefetch_ahead(v + 32 * p);
            w[p] = load_lanes<kFull>(v + 4 * n * p, n);
        }
    }
};

// Per chunk and token: the exact block sums, one FMA with the blocks' combined scales. NT is a
// template parameter so every token's accumulator stays in a register.
template <int NT, typename Row>
void dot_q16_n(const Row& row, int64_t n_blocks, const Q16Row* x, float* out) {
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    auto step = [&](auto full, int64_t g0, int n) {
        constexpr bool kFull = decltype(full)::value;
        const __m256 ws = row.template scales8<kFull>(n, g0);
        __m256i w[8];
        row.template chunk<kFull>(g0, n, w);
        for (int t = 0; t < NT; ++t) {
            const __m256 d = _mm256_castsi256_ps(load_lanes<kFull>(x[t].d + g0, n));
            const __m256i p = Row::template dot<kFull>(w, reinterpret_cast<const int8_t*>(x[t].q + g0 * 32), n);
            acc[t] = _mm256_fmadd_ps(Row::block_sums(p, load_lanes<kFull>(x[t].s + g0, n)), _mm256_mul_ps(ws, d), acc[t]);
        }
    };
    int64_t g0 = 0;
    for (; g0 + kChunk <= n_blocks; g0 += kChunk) step(std::true_type{}, g0, kChunk);
    if (g0 < n_blocks) step(std::false_type{}, g0, int(n_blocks - g0));
    for (int t = 0; t < NT; ++t) out[t] = x86::hsum256(acc[t]) * Row::kRowFactor;
}

void activation_layout(int16_t* q, int64_t n_blocks) { planes::activation_layout<kChunk>(q, n_blocks); }
void q8_weight_layout(uint8_t* w, int64_t n_blocks) {
    planes::q8_weight_layout<kChunk, Q8Row::kOffset>(reinterpret_cast<int8_t*>(w), n_blocks);
}

template <typename Format>
void nibbles_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                     float* out) {
    const NibbleRow<Format> row{blocks, scales};
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

void q8_dot_q16(const uint8_t* w, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok, float* out) {
    const Q8Row row{reinterpret_cast<const int8_t*>(w), reinterpret_cast<const uint16_t*>(scales)};
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

// The `exact` path: fp32 activations, one block per step, its 32 weights widened to floats once
// for every token.
template <typename Format, int NT>
void blocks_dot_f32_n(const uint8_t* blocks, const uint8_t* scale_bytes, int64_t n_blocks, const float* const* x,
                       float* out) {
    const auto* scales = reinterpret_cast<const typename Format::Scale*>(scale_bytes);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Format::kBlockBytes);
        x86::decode_block_i8<Format>(blocks + g * Format::kBlockBytes, &e0, &e1);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8)));
        const __m256 sc = _mm256_set1_ps(Format::int_scale(scales[g]));
        for (int t = 0; t < NT; ++t) {
            const float* xb = x[t] + g * Format::kBlock;
            __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), s);
            acc[t] = _mm256_fmadd_ps(s, sc, acc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) out[t] = x86::hsum256(acc[t]);
}

template <typename Format>
void blocks_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const float* const* x, int n_tok,
                     float* out) {
    with_token_count(n_tok, [&](auto nt) { blocks_dot_f32_n<Format, decltype(nt)::value>(blocks, scales, n_blocks, x, out); });
}

// bf16 weights 16 at a time: one load, even elements to fp32 by a shift and odd ones by a mask
// (activations come in that order, bf16_activation_layout), an accumulator for each half.
template <int NT>
void bf16_dot_n(const uint16_t* w, int64_t n, const float* const* x, float* out) {
    __m256 even[NT], odd[NT];
    for (int t = 0; t < NT; ++t) even[t] = odd[t] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        x86::prefetch_ahead(w + i);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int t = 0; t < NT; ++t) {
            even[t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x[t] + i), even[t]);
            odd[t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x[t] + i + 8), odd[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        float s = x86::hsum256(_mm256_add_ps(even[t], odd[t]));
        for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[j]) * x[t][j];
        out[t] = s;
    }
}

void bf16_activation_layout(float* x, int64_t n) { x86::even_odd_layout<16>(x, n); }

void bf16_dot_f32(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, int n_tok, float* out) {
    with_token_count(n_tok, [&](auto nt) {
        constexpr int NT = decltype(nt)::value;
        for (int64_t r = 0; r < n_rows; ++r) bf16_dot_n<NT>(w + r * n, n, x, out + r * NT);
    });
}

// attention.h's attention with 8 lanes (the AVX-512 kernels' scheme at half width): the same float
// operations in the same order, so the same bits as the portable code, whose per-key dot products
// are one serial chain of adds (the AVX2 prefill's attention took 470 ms of 4.8 s on it).

// Lanes [0, n) of 8 as an all-ones mask, and lane j set where bit j of `bits` is.
inline __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 lanes_of_bits(uint32_t bits) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), bit), bit));
}

// rows r[i] lane j = M[i][j] -> r[j] lane i = M[i][j].
inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // u[i + c], 128-bit half H: rows i .. i + 3 of column 4H + c
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
        r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}

inline __m256 exp_nonpositive8(__m256 x) {
    auto k = [](float v) { return _mm256_set1_ps(v); };
    const __m256 xc = _mm256_max_ps(k(-87.f), x);  // NaN stays NaN, as std::max(x, -87.f)
    const __m256 magic = k(12582912.f);              // round_half_even
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, k(1.44269504f)), magic), magic);
    const __m256 r =
        _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, k(0.693145752f))), _mm256_mul_ps(n, k(1.42860677e-6f)));
    __m256 p = k(1.38888889e-3f);
    for (float c : {8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f, 0.5f, 1.f, 1.f})
        p = _mm256_add_ps(_mm256_mul_ps(p, r), k(c));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 under = _mm256_cmp_ps(x, k(-87.3f), _CMP_LT_OQ);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

void softmax_row(float* s, int64_t S, float sink, float m) {
    __m256 part = _mm256_setzero_ps();  // partial sum i takes elements j with j % 8 == i
    const __m256 mv = _mm256_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        part = _mm256_add_ps(part, e);
    }
    alignas(32) float parts[8];
    _mm256_store_ps(parts, part);
    for (; j < S; ++j) parts[j % attention::kParts] += s[j] = attention::exp_nonpositive(s[j] - m);
    const float z = attention::softmax_denominator(parts, sink, m);
    const __m256 zv = _mm256_set1_ps(z);
    int64_t i = 0;
    for (; i + 8 <= S; i += 8) _mm256_storeu_ps(s + i, _mm256_div_ps(_mm256_loadu_ps(s + i), zv));
    for (; i < S; ++i) s[i] /= z;
}

// Keys (and values) fetched ahead: a kv head's rows are a stride apart, which the hardware
// prefetchers do not follow.
constexpr int64_t kKeysAhead = 8;

inline void prefetch_row(const float* row) { _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0); }

// Raw scores q_h . k_j of keys [j0, j0 + 8) (fewer at the end) for every head: the keys' rows are
// transposed 8 floats at a time, so lane j of a head's sum adds q[d] k_j[d] over d in order.
template <int D>
void score_block(const float* q, int group, const float* k, int64_t j0, int n, int64_t S, int64_t stride,
                 uint32_t visible, float* scores) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const __m256i lanes = first_lanes(n);
    if (!visible) {
        for (int h = 0; h < group; ++h) _mm256_maskstore_ps(scores + h * S + j0, lanes, minus_inf);
        return;
    }
    alignas(32) float sums[attention::kMaxGroup][8] = {};
    for (int r = 0; r < D / 8; ++r) {
        __m256 kt[8];
        for (int j = 0; j < 8; ++j) {
            if (j0 + kKeysAhead + j < S) prefetch_row(k + (j0 + kKeysAhead + j) * stride + 8 * r);
            kt[j] = j < n ? _mm256_loadu_ps(k + (j0 + j) * stride + 8 * r) : _mm256_setzero_ps();
        }
        transpose8(kt);  // kt[i] lane j = k_{j0 + j}[8 r + i]
        for (int h = 0; h < group; ++h) {
            const float* qh = q + h * D + 8 * r;
            __m256 acc = _mm256_load_ps(sums[h]);
            for (int i = 0; i < 8; ++i) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(qh[i]), kt[i]));
            _mm256_store_ps(sums[h], acc);
        }
    }
    const __m256 seen = lanes_of_bits(visible);
    for (int h = 0; h < group; ++h)
        _mm256_maskstore_ps(scores + h * S + j0, lanes, _mm256_blendv_ps(minus_inf, _mm256_load_ps(sums[h]), seen));
}

// out[h] += p_hj v_j over the visible keys in order, for HN heads whose accumulators stay in registers.
template <int D, int HN>
void weigh_values(const float* v, int64_t S, int64_t stride, const int64_t* k_pos, int64_t q_pos, int64_t window,
                  const float* scores, float* out) {
    constexpr int R = D / 8;
    __m256 acc[HN * R];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t j = 0; j < S; ++j) {
        if (!attention::key_visible(k_pos[j], q_pos, window)) continue;
        for (int r = 0; r < R; ++r) {
            if (j + kKeysAhead < S) prefetch_row(v + (j + kKeysAhead) * stride + 8 * r);
            const __m256 vj = _mm256_loadu_ps(v + j * stride + 8 * r);
            for (int h = 0; h < HN; ++h)
                acc[h * R + r] = _mm256_add_ps(acc[h * R + r], _mm256_mul_ps(_mm256_set1_ps(scores[h * S + j]), vj));
        }
    }
    for (int h = 0; h < HN; ++h)
        for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + h * D + 8 * r, acc[h * R + r]);
}

template <int D>
void attend_group_n(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride,
                    const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window, float sqrt_d,
                    float* scores, float* out) {
    for (int64_t j0 = 0; j0 < S; j0 += 8) {
        const int n = int(std::min<int64_t>(8, S - j0));
        uint32_t visible = 0;
        for (int j = 0; j < n; ++j) visible |= uint32_t(attention::key_visible(k_pos[j0 + j], q_pos, window)) << j;
        score_block<D>(q, group, k, j0, n, S, stride, visible, scores);
    }
    // Then per head, 8 scores at a time: / sqrt_d (-inf stays -inf) and the max with the sink
    // (exact whatever the order; a NaN score is passed over, as std::max passes it).
    const __m256 root = _mm256_set1_ps(sqrt_d), minus_inf = _mm256_set1_ps(-INFINITY);
    for (int h = 0; h < group; ++h) {
        float* sh = scores + h * S;
        __m256 mv = _mm256_set1_ps(sinks[h]);
        for (int64_t i = 0; i < S; i += 8) {
            const __m256i lanes = first_lanes(S - i);
            const __m256 sv = _mm256_div_ps(
                _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(sh + i, lanes), _mm256_castsi256_ps(lanes)), root);
            _mm256_maskstore_ps(sh + i, lanes, sv);
            mv = _mm256_max_ps(sv, mv);
        }
        alignas(32) float lane_max[8];
        _mm256_store_ps(lane_max, mv);
        softmax_row(sh, S, sinks[h], *std::max_element(lane_max, lane_max + 8));
    }
    // Accumulators for as many heads as 12 of the 16 registers hold.
    constexpr int kHeads = D >= 96 ? 1 : 96 / D;
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

// fma_tiles' lanes: 8 rows per register; 2 x 6 accumulators, the strip's two weight registers and
// a broadcast fill 15 of the 16 registers.
struct TileLanes {
    static constexpr int kLanes = 8, kTokens = 6;
    using F = __m256;
    static F zero() { return _mm256_setzero_ps(); }
    static __m256i words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static F even_elements(const uint32_t* p) { return _mm256_castsi256_ps(_mm256_slli_epi32(words(p), 16)); }
    static F odd_elements(const uint32_t* p) {
        return _mm256_castsi256_ps(_mm256_and_si256(words(p), _mm256_set1_epi32(int(0xFFFF0000u))));
    }
    static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static void store(float* p, F v) { _mm256_store_ps(p, v); }
};

void bf16_tile_f32(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    fma_tiles::tile_f32<TileLanes>(w, K, n_rows, packed, n_groups, out);
}

}  // namespace
}  // namespace avx2
using namespace avx2;

#if defined(MOEMESH_AVXVNNI)
const KernelTable kAvx2VnniKernels =
#else
const KernelTable kAvx2Kernels =
#endif
    {"avx2",
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

}  // namespace moemesh
