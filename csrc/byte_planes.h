// The byte layout of the x86 fast path, shared by the AVX2 kernels (chunks of 8 blocks), the
// AVX-512 ones (16) and the AMX tiles (avx512_layout.h), which must all compute the same exact
// integer sum per block: activation codes as planes of signed bytes, MXFP4 nibbles as offset bytes.
// Functions are static or templates: each includer compiles them with its own target flags (AVX2
// at least).
//
// Activation codes split into signed bytes, x = 256 * hi + lo (Q16Block::kMax keeps both in
// [-128, 127]); weights become unsigned bytes with an offset (MXFP4's doubled values + 12, Q4's
// codes, Q8 values + 128 where the dot product has no 16-bit intermediate to overflow), whose share,
// offset * (sum of the block's codes), is taken back out per block. A chunk is kChunk blocks (a
// row's last one may be shorter); a row's codes are stored chunk by chunk as 16 planes, [hi of
// planes 0-7 | lo of planes 0-7], each of 4n bytes for a chunk of n blocks: plane 2c + e, bytes
// 4k .. 4k + 3 hold elements 8c + e, + 2, + 4, + 6 of block k. So in every register the 32-bit
// lane k belongs to block k, and a block's products all land in one lane.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "formats.h"

namespace moemesh {
namespace planes {

// Byte (plane, k, m) of a chunk of n blocks, planes of 4n bytes.
inline int plane_byte(int plane, int n, int k, int m) { return plane * 4 * n + 4 * k + m; }

// A 4-bit format's code -> its integer + kIntOffset (MXFP4: doubled values + 12; Q4: the code),
// repeated in every 16 bytes (a pshufb / vpermb table).
template <typename Format>
struct alignas(64) OffsetBytes {
    uint8_t values[64];
    constexpr OffsetBytes() : values{} {
        for (int i = 0; i < 64; ++i) values[i] = uint8_t(Format::kInts[i & 15] + Format::kIntOffset);
    }
};
template <typename Format>
inline constexpr OffsetBytes<Format> kOffsetBytes{};

// Rewrites a row chunk by chunk: put(value, tmp, n, k, plane, m) places element 8c + 2m + p of
// block k (weight plane 2c + p) into tmp, which then replaces the chunk's bytes.
template <int kChunk, typename T, typename Put>
void relayout_chunks(T* row, int64_t n_blocks, const Put& put) {
    int8_t tmp[kChunk * 32 * sizeof(T)];
    for (int64_t g0 = 0; g0 < n_blocks; g0 += kChunk) {
        const int n = int(n_blocks - g0 < kChunk ? n_blocks - g0 : kChunk);
        T* chunk = row + g0 * 32;
        for (int k = 0; k < n; ++k)
            for (int e = 0; e < 32; ++e) put(chunk[k * 32 + e], tmp, n, k, 2 * (e / 8) + e % 2, (e % 8) / 2);
        std::memcpy(chunk, tmp, size_t(n) * 32 * sizeof(T));
    }
}

// A row of int16 activation codes -> its 16 byte planes per chunk (the q16_layout of a table),
// 32 codes (one block) a step with AVX2: the bytes of hi = (x + 128) >> 8 and of lo = x - 256 hi
// (x's low byte), each put in plane order within the block by a byte shuffle (plane 2c + e holds
// elements 8c + e, + 2, + 4, + 6: the even and odd elements of each group of 8), then the blocks'
// 8 dwords transposed into the chunk's planes. (Element by element it was a third of a prefill
// matmul's fixed cost: 1 ns a code.)
template <int kChunk>
void activation_layout(int16_t* q, int64_t n_blocks) {
    alignas(32) uint32_t hi[kChunk][8], lo[kChunk][8];
    const __m256i in_plane_order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                                    0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    const __m256i low_byte = _mm256_set1_epi16(0xFF), half = _mm256_set1_epi16(128);
    for (int64_t g0 = 0; g0 < n_blocks; g0 += kChunk) {
        const int n = int(n_blocks - g0 < kChunk ? n_blocks - g0 : kChunk);
        int16_t* chunk = q + g0 * 32;
        for (int k = 0; k < n; ++k) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * k));
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * k + 16));
            // packs works per 128-bit lane: bytes come as elements 0-7, 16-23, 8-15, 24-31
            auto bytes = [&](__m256i x, __m256i y) {
                return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(_mm256_packus_epi16(x, y), 0xD8), in_plane_order);
            };
            const __m256i h = bytes(_mm256_and_si256(_mm256_srai_epi16(_mm256_add_epi16(a, half), 8), low_byte),
                                    _mm256_and_si256(_mm256_srai_epi16(_mm256_add_epi16(b, half), 8), low_byte));
            const __m256i l = bytes(_mm256_and_si256(a, low_byte), _mm256_and_si256(b, low_byte));
            _mm256_store_si256(reinterpret_cast<__m256i*>(hi[k]), h);
            _mm256_store_si256(reinterpret_cast<__m256i*>(lo[k]), l);
        }
        char* out = reinterpret_cast<char*>(chunk);  // plane p: n dwords from byte 4 p n
        for (int p = 0; p < 8; ++p)
            for (int k = 0; k < n; ++k) {
                std::memcpy(out + 4 * (p * n + k), &hi[k][p], 4);
                std::memcpy(out + 4 * ((8 + p) * n + k), &lo[k][p], 4);
            }
    }
}

// A row of Q8 values -> its 8 planes per chunk, each value plus `offset` (0 or 128, as bytes).
template <int kChunk, int kOffset>
void q8_weight_layout(int8_t* w, int64_t n_blocks) {
    relayout_chunks<kChunk>(w, n_blocks, [](int8_t x, int8_t* tmp, int n, int k, int plane, int m) {
        tmp[plane_byte(plane, n, k, m)] = int8_t(uint8_t(x) ^ uint8_t(kOffset));
    });
}

}  // namespace planes
}  // namespace moemesh
