// The byte layout the AVX-512 fast path shares between its VNNI kernels (kernels_avx512.cpp) and
// its AMX tiles (kernels_amx.cpp), which must compute the same sums to the bit: the chunk and
// plane geometry of the activation codes, the offset bytes MXFP4 nibbles become and their scales.
// Functions are static: each includer compiles them with its own target flags.
//
// Activation codes split into signed bytes, x = 256 * hi + lo (Q16Block::kMax keeps both in
// [-128, 127]); weights become unsigned bytes with an offset (MXFP4's doubled values + 12, Q8
// values + 128), whose share, offset * (sum of the block's codes), is taken back out per block.
// A chunk is 16 blocks (a row's last one may be shorter); a row's codes are stored chunk by chunk
// as 16 planes, [hi of planes 0-7 | lo of planes 0-7], each of 4n bytes for a chunk of n blocks:
// plane 2c + e, bytes 4k .. 4k + 3 hold elements 8c + e, + 2, + 4, + 6 of block k.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "formats.h"

namespace moemesh {
namespace avx512 {

constexpr int kChunk = 16;

// Byte (plane, k, m) of a chunk of n blocks, planes of 4n bytes.
inline int plane_byte(int plane, int n, int k, int m) { return plane * 4 * n + 4 * k + m; }

// MXFP4 nibble -> doubled value + kOffset, repeated in every 16 bytes (a pshufb / vpermb table).
struct alignas(64) Mxfp4OffsetBytes {
    static constexpr int kOffset = 12;
    uint8_t values[64];
    constexpr Mxfp4OffsetBytes() : values{} {
        for (int i = 0; i < 64; ++i) values[i] = uint8_t(Mxfp4::kDoubled[i & 15] + kOffset);
    }
};
inline constexpr Mxfp4OffsetBytes kMxfp4OffsetBytes{};

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

}  // namespace avx512
}  // namespace moemesh
