// AVX-512 kernels (F/BW/VL + VNNI; compiled with those flags, selected only when the CPU has them).
// fp32 path: a block's 32 weights are two zmm registers. int16 path: one zmm of 32 int16 weights
// per block and a VNNI vpdpwssd per token (exact int32 block sums).
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "x86_common.h"

namespace moemesh {
namespace {

constexpr int kPrefetchBytes = 4096;

// Fixed-order horizontal sum of 16 lanes: fold the halves, then the 8-lane AVX sum.
inline float hsum512(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return x86::hsum256(_mm256_add_ps(lo, hi));
}

void mxfp4_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
                   const float* const* x, int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Mxfp4::kBlockBytes);
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e0));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e1));
        const __m512 sc = _mm512_set1_ps(Mxfp4::scale(scales[g]) * 0.5f);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Mxfp4::kBlock;
            const __m512 s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
            acc[t] = _mm512_fmadd_ps(s, sc, acc[t]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum512(acc[t]);
}

// 16 scale bytes -> 2^(s-127) * 0.5 as floats (s = 0 is the denormal 2^-128 after halving).
inline __m512 half_scales16(__mmask16 m, const uint8_t* s) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s));
    const __mmask16 zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), zero, _mm512_set1_epi32(0x00400000));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0.5f));
}

// Two consecutive blocks -> their 32 int16 weights each, element order.
inline void decode_pair_i16(const uint8_t* codes, __m512i* w0, __m512i* w1) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Mxfp4::kDoubled)));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    const __m256i even = _mm256_shuffle_epi8(lut, _mm256_and_si256(b, m));
    const __m256i odd = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(b, 4), m));
    const __m256i u0 = _mm256_unpacklo_epi8(even, odd);  // lane k: block k elements 0..15
    const __m256i u1 = _mm256_unpackhi_epi8(even, odd);  // lane k: block k elements 16..31
    *w0 = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(u0, u1, 0x20));
    *w1 = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(u0, u1, 0x31));
}

inline __m512i decode_one_i16(const uint8_t* codes) {
    __m128i e0, e1;
    x86::decode_block_i8(codes, &e0, &e1);
    return _mm512_cvtepi8_epi16(_mm256_set_m128i(e1, e0));
}

// Blocks go 16 at a time: their combined scales (weight x activation) are computed as one vector,
// then blocks are decoded two at a time. Per token the sum order is the same for any n_tok.
void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    alignas(64) float cs[kMaxTokens][16];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < n_blocks; g0 += 16) {
        const int n = int(n_blocks - g0 < 16 ? n_blocks - g0 : 16);
        const __mmask16 m = __mmask16((1u << n) - 1u);
        const __m512 ws = half_scales16(m, scales + g0);
        for (int t = 0; t < n_tok; ++t) _mm512_store_ps(cs[t], _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(m, x[t].d + g0)));
        int i = 0;
        for (; i + 2 <= n; i += 2) {
            const int64_t g = g0 + i;
            __m512i w0, w1;
            x86::prefetch_ahead(blocks + g * Mxfp4::kBlockBytes);
            decode_pair_i16(blocks + g * Mxfp4::kBlockBytes, &w0, &w1);
            for (int t = 0; t < n_tok; ++t) {
                const int16_t* q = x[t].q + g * Mxfp4::kBlock;
                const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(q));
                const __m512i p1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(q + 32));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(cs[t][i]), acc[t]);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(cs[t][i + 1]), acc[t]);
            }
        }
        if (i < n) {
            const int64_t g = g0 + i;
            const __m512i w = decode_one_i16(blocks + g * Mxfp4::kBlockBytes);
            for (int t = 0; t < n_tok; ++t) {
                const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x[t].q + g * Mxfp4::kBlock));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(cs[t][i]), acc[t]);
            }
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum512(acc[t]);
}

void bf16_dot_f32(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        // Stream ahead: hardware prefetchers stop at 4 KiB page edges of the mapped checkpoint.
        x86::prefetch_ahead(w + i);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
        const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
        for (int t = 0; t < n_tok; ++t) acc[t] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x[t] + i), acc[t]);
    }
    for (int t = 0; t < n_tok; ++t) {
        float s = hsum512(acc[t]);
        for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[j]) * x[t][j];
        out[t] = s;
    }
}

}  // namespace

const KernelTable kAvx512Kernels = {"avx512", mxfp4_dot_f32, mxfp4_dot_q16, bf16_dot_f32};

}  // namespace moemesh
