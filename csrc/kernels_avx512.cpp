// AVX-512 kernels (F/BW/VL + VNNI; compiled with those flags, selected only when the CPU has them).
// fp32 path: a block's 32 weights are two zmm registers. int16 path: one zmm of 32 int16 weights
// per block and a VNNI vpdpwssd per token (exact int32 block sums).
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "x86_common.h"

namespace moemesh {
namespace {

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

void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_set_m128i(e1, e0));  // 32 int16, element order
        const float ws = Mxfp4::scale(scales[g]) * 0.5f;
        for (int t = 0; t < n_tok; ++t) {
            const __m512i q = _mm512_loadu_si512(x[t].q + g * Mxfp4::kBlock);
            const __m512i p32 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, q);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), _mm512_set1_ps(ws * x[t].d[g]), acc[t]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum512(acc[t]);
}

void bf16_dot_f32(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
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
