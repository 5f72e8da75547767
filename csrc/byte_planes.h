// The byte layout of the x86 fast path, shared by the AVX2 kernels (chunks of 8 blocks), the
// AVX-512 ones (16) and the AMX tiles (avx512_layout.h), which must all compute the same exact
// integer sum per block: activation codes as planes of signed bytes, MXFP4 nibbles as offset bytes.
// Functions are static or templates: each includer compiles them with its own target flags.
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

inline void split_code(int16_t x, int8_t* hi, int8_t* lo) {
    const int h = (int(x) + 128) >> 8;
    *hi = int8_t(h);
    *lo = int8_t(int(x) - 256 * h);
}

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

// A row of int16 activation codes -> its 16 byte planes per chunk (the q16_layout of a table).
template <int kChunk>
void activation_layout(int16_t* q, int64_t n_blocks) {
    relayout_chunks<kChunk>(q, n_blocks, [](int16_t x, int8_t* tmp, int n, int k, int plane, int m) {
        split_code(x, &tmp[plane_byte(plane, n, k, m)], &tmp[plane_byte(8 + plane, n, k, m)]);
    });
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
