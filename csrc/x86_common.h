// Small x86 helpers shared by the AVX2 and AVX-512 kernels (header-only so each file compiles
// them with its own target flags).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "formats.h"
#include "kernels.h"

namespace moemesh {
namespace x86 {

// A block's 32 integers in element order, e0 = elements 0..15, e1 = 16..31: Q8's values as
// stored (natural order), a 4-bit format's (MXFP4, Q4) 16 code bytes through Format::kInts (low
// nibble = even element, high nibble = odd element).
template <typename Format>
static inline void decode_block_i8(const uint8_t* codes, __m128i* e0, __m128i* e1) {
    if constexpr (std::is_same_v<Format, Q8>) {
        *e0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
        *e1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16));
    } else {
        const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(Format::kInts));
        const __m128i m = _mm_set1_epi8(0x0F);
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
        const __m128i even = _mm_shuffle_epi8(lut, _mm_and_si128(b, m));
        const __m128i odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), m));
        *e0 = _mm_unpacklo_epi8(even, odd);
        *e1 = _mm_unpackhi_epi8(even, odd);
    }
}

// The near prefetch into L1, the far one into L2 (distances and why: kernels.h).
static inline void prefetch_ahead(const void* p) {
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchFarBytes, _MM_HINT_T1);
}

// Fixed-order horizontal sum: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Every full kGroup-element group of an activation row becomes [even elements | odd elements]:
// the order in which the bf16 kernels widen a register of weights (even ones by a shift, odd ones
// by a mask).
template <int kGroup>
void even_odd_layout(float* x, int64_t n) {
    for (int64_t c = 0; c + kGroup <= n; c += kGroup) {
        float tmp[kGroup];
        for (int j = 0; j < kGroup / 2; ++j) tmp[j] = x[c + 2 * j], tmp[kGroup / 2 + j] = x[c + 2 * j + 1];
        std::memcpy(x + c, tmp, sizeof tmp);
    }
}

static inline __m256 bf16x8_to_f32(const uint16_t* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

}  // namespace x86
}  // namespace moemesh
