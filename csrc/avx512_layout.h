// The AVX-512 geometry of byte_planes.h's layout, shared by the VNNI kernels (kernels_avx512.cpp)
// and the AMX tiles (kernels_amx.cpp), which must compute the same sums to the bit: chunks of 16
// blocks, and the scales of 16 blocks as floats.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "byte_planes.h"
#include "formats.h"

namespace moemesh {
namespace avx512 {

constexpr int kChunk = 16;
using planes::plane_byte;
using planes::kOffsetBytes;
// The first n of 16 scale bytes -> 2^(s-127) * 0.5 as floats (s = 0 is the denormal 2^-128 after
// halving); lanes past n are exact zeros. They must not be denormals: an Intel core takes a
// microcode assist for every denormal operand, which made whole rows several times slower.
static inline __m512 half_scales16(int n, const uint8_t* s) {
    const __mmask16 m = __mmask16((1u << n) - 1u);
    const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s));
    const __mmask16 zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), zero & m, _mm512_set1_epi32(0x00400000));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0.5f));
}

// The first n of 16 fp16 scales (Q4, Q8; nothing past them read) as floats, the rest zeros.
static inline __m512 f16_scales16(int n, const uint16_t* s) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(n >= 16 ? 0xFFFF : (1u << n) - 1u), s));
}

// rows r[i] lane j = M[i][j] -> r[j] lane i = M[i][j].
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    auto pd = [](__m512 x) { return _mm512_castps_pd(x); };
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i]), pd(t[i + 2])));
        u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i]), pd(t[i + 2])));
        u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[i + 1]), pd(t[i + 3])));
        u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[i + 1]), pd(t[i + 3])));
    }
    // u[4b + c], 128-bit lane L: rows 4b .. 4b + 3 of column 4L + c.
    for (int c = 0; c < 4; ++c) {
        const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88),
                     f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
    }
}

}  // namespace avx512
}  // namespace moemesh
