// The bf16 matmul for many tokens on fused multiply-add vector units (AVX2, and AVX-512 without
// AMX: Zen 4), behind KernelTable's bf16_tile_* entries. The vector kernels compute one row's dot
// product with a few tokens (lanes = elements of the row), so every FMA needs its own activation
// load and a load port, not the FMA unit, sets the pace (AVX2: ~80 GFLOP/s on two cores). Here
// lanes are rows instead, as in a BLAS micro-kernel: a vector holds one element of 2 x kLanes
// rows, each token's activation is broadcast once and feeds two FMAs, and 2 x kTokens
// accumulators stay in registers for the whole row. Weights are re-laid out per block of
// kBf16TileRows rows on the fly (the pass is amortized over every token of the prefill), so the
// checkpoint's layout stays as it is. Each output is one fp32 FMA chain over k in order: exact
// within tolerance, not the vector kernels' bits (the same contract as the AMX tiles).
// Header-only, in an unnamed namespace: each ISA file compiles its own copy with its own target
// flags and lane traits (a shared inline copy could be the AVX-512 one on an AVX2 machine).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace moemesh {
namespace fma_tiles {
namespace {

// One group's activations: element k of token t at k * kTileTokens + t (zeros past n_tok), so
// the tokens a micro-kernel broadcasts at one k share a cache line.
int64_t tile_bytes(int64_t K) { return K * kTileTokens * int64_t(sizeof(float)); }

void tile_pack(const float* const* x, int n_tok, int64_t K, int8_t* packed) {
    float* p = reinterpret_cast<float*>(packed);
    if (n_tok < kTileTokens)  // a full group's packing writes every element
        std::memset(p, 0, size_t(tile_bytes(K)));
    for (int t = 0; t < n_tok; ++t)
        for (int64_t k = 0; k < K; ++k) p[k * kTileTokens + t] = x[t][k];
}

// kStrip rows of K bf16 -> element pairs (k, k + 1) as one 32-bit word, word p of strip row r at
// p * kStrip + r: one vector load holds a pair of elements of kLanes consecutive rows; a shift
// widens the even element to fp32, a mask the odd one.
template <int kStrip>
void strip_pack(const uint16_t* w, int64_t K, uint32_t* out) {
    for (int r = 0; r < kStrip; ++r)
        for (int64_t p = 0; p < K / 2; ++p) std::memcpy(out + p * kStrip + r, w + r * K + 2 * p, 4);
}

// out[r * kTileTokens + t] = sum_k W[r][k] x[t][k] for the strip's 2 x kLanes rows and NT tokens
// (x: the packed group from its first token).
template <class V, int NT>
void strip_tokens(const uint32_t* strip, const float* x, int64_t K, float* out) {
    constexpr int L = V::kLanes;
    typename V::F lo[NT], hi[NT];  // rows [0, L) and [L, 2L) of the strip
    for (int t = 0; t < NT; ++t) lo[t] = hi[t] = V::zero();
    for (int64_t p = 0; p < K / 2; ++p) {
        const uint32_t* wp = strip + p * 2 * L;
        const float* xp = x + 2 * p * kTileTokens;
        typename V::F w0 = V::even_elements(wp), w1 = V::even_elements(wp + L);
        for (int t = 0; t < NT; ++t) {
            const typename V::F b = V::broadcast(xp + t);
            lo[t] = V::fma(w0, b, lo[t]);
            hi[t] = V::fma(w1, b, hi[t]);
        }
        w0 = V::odd_elements(wp), w1 = V::odd_elements(wp + L);
        for (int t = 0; t < NT; ++t) {
            const typename V::F b = V::broadcast(xp + kTileTokens + t);
            lo[t] = V::fma(w0, b, lo[t]);
            hi[t] = V::fma(w1, b, hi[t]);
        }
    }
    alignas(64) float lanes[L];
    for (int t = 0; t < NT; ++t) {
        V::store(lanes, lo[t]);
        for (int i = 0; i < L; ++i) out[i * kTileTokens + t] = lanes[i];
        V::store(lanes, hi[t]);
        for (int i = 0; i < L; ++i) out[(L + i) * kTileTokens + t] = lanes[i];
    }
}

// KernelTable::bf16_tile_f32: n_rows (a multiple of kBf16TileRows) rows against n_groups packed
// groups, out[(g * n_rows + r) * kTileTokens + t]. A block of rows is laid out once, then every
// group goes by it while it sits in L2.
template <class V>
void tile_f32(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    constexpr int kStrip = 2 * V::kLanes;
    constexpr int kFull = V::kTokens, kRest = kTileTokens % V::kTokens;
    static_assert(kBf16TileRows % kStrip == 0, "whole strips per block");
    thread_local std::vector<uint32_t> block;
    scratch(block, size_t(kBf16TileRows * K / 2));
    for (int64_t r0 = 0; r0 < n_rows; r0 += kBf16TileRows) {
        for (int s = 0; s < kBf16TileRows / kStrip; ++s)
            strip_pack<kStrip>(w + (r0 + s * kStrip) * K, K, block.data() + s * kStrip * K / 2);
        for (int64_t g = 0; g < n_groups; ++g) {
            const float* xg = reinterpret_cast<const float*>(packed + g * tile_bytes(K));
            for (int s = 0; s < kBf16TileRows / kStrip; ++s) {
                const uint32_t* strip = block.data() + s * kStrip * K / 2;
                float* o = out + (g * n_rows + r0 + s * kStrip) * kTileTokens;
                int t0 = 0;
                for (; t0 + kFull <= kTileTokens; t0 += kFull) strip_tokens<V, kFull>(strip, xg + t0, K, o + t0);
                if constexpr (kRest > 0) strip_tokens<V, kRest>(strip, xg + t0, K, o + t0);
            }
        }
    }
}

}  // namespace
}  // namespace fma_tiles
}  // namespace moemesh
