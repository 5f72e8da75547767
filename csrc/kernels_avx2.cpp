// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c; selected only when the CPU has them).
// One MXFP4 block (32 weights) per step: nibbles -> doubled int8 through a pshufb table.
#include <immintrin.h>

#include "formats.h"
#include "kernels.h"
#include "x86_common.h"

namespace moemesh {
namespace {

void mxfp4_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
                   const float* const* x, int n_tok, float* out) {
    __m256 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Mxfp4::kBlockBytes);
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8)));
        const __m256 sc = _mm256_set1_ps(Mxfp4::scale(scales[g]) * 0.5f);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Mxfp4::kBlock;
            __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), s);
            acc[t] = _mm256_fmadd_ps(s, sc, acc[t]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = x86::hsum256(acc[t]);
}

// One block of 32 int16 weights (w0: elements 0..15, w1: 16..31) with scale ws against every
// token's int16 block g: exact int32 sums, then one FMA per token.
inline void accumulate_q16_block(__m256i w0, __m256i w1, float ws, const Q16Row* x, int n_tok, int64_t g,
                                 __m256* acc) {
    for (int t = 0; t < n_tok; ++t) {
        const __m256i* q = reinterpret_cast<const __m256i*>(x[t].q + g * 32);
        const __m256i p32 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(q)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(q + 1)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(ws * x[t].d[g]), acc[t]);
    }
}

void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    __m256 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Mxfp4::kBlockBytes);
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        accumulate_q16_block(_mm256_cvtepi8_epi16(e0), _mm256_cvtepi8_epi16(e1), Mxfp4::scale(scales[g]) * 0.5f,
                             x, n_tok, g, acc);
    }
    for (int t = 0; t < n_tok; ++t) out[t] = x86::hsum256(acc[t]);
}

void bf16_dot_f32(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
    __m256 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        x86::prefetch_ahead(w + i);
        const __m256 wf = x86::bf16x8_to_f32(w + i);
        for (int t = 0; t < n_tok; ++t) acc[t] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x[t] + i), acc[t]);
    }
    for (int t = 0; t < n_tok; ++t) {
        float s = x86::hsum256(acc[t]);
        for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[j]) * x[t][j];
        out[t] = s;
    }
}

void q8_dot_q16(const int8_t* w, const uint16_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                float* out) {
    __m256 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        const int8_t* wb = w + g * Q8::kBlock;
        x86::prefetch_ahead(wb);
        accumulate_q16_block(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb))),
                             _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16))),
                             _cvtsh_ss(scales[g]), x, n_tok, g, acc);
    }
    for (int t = 0; t < n_tok; ++t) out[t] = x86::hsum256(acc[t]);
}

}  // namespace

const KernelTable kAvx2Kernels = {"avx2", mxfp4_dot_f32, mxfp4_dot_q16, nullptr, bf16_dot_f32, q8_dot_q16, nullptr};

}  // namespace moemesh
