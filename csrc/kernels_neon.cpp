// NEON kernels for AArch64 (phones, Raspberry Pi), built three times: baseline ARMv8, which runs on
// a Cortex-A72 Pi; with MOEMESH_DOTPROD for the dot-product instructions (ARMv8.2 sdot); and with
// MOEMESH_I8MM besides for the int8 matrix multiply (smmla: Cortex-A510/A710/X2 and later) on many
// tokens, as AMX tiles are on x86.
#include <arm_neon.h>

#include <cstring>
#include <type_traits>

#include "formats.h"
#include "kernels.h"

namespace moemesh {
namespace {

// A block's 32 integers in element order (e0: elements 0..15, e1: 16..31): Q8's values as
// stored, a 4-bit format's 16 code bytes through Format::kInts.
template <typename Format>
inline void decode_block_i8(const uint8_t* codes, int8x16_t* e0, int8x16_t* e1) {
    if constexpr (std::is_same_v<Format, Q8>) {  // values as stored
        *e0 = vld1q_s8(reinterpret_cast<const int8_t*>(codes));
        *e1 = vld1q_s8(reinterpret_cast<const int8_t*>(codes + 16));
    } else {
        const int8x16_t lut = vld1q_s8(Format::kInts);
        const uint8x16_t b = vld1q_u8(codes);
        const int8x16_t even = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F)));
        const int8x16_t odd = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
        *e0 = vzip1q_s8(even, odd);
        *e1 = vzip2q_s8(even, odd);
    }
}

inline float32x4_t widen_i8(int8x8_t v, bool high_half) {
    const int16x8_t s16 = vmovl_s8(v);
    return vcvtq_f32_s32(vmovl_s16(high_half ? vget_high_s16(s16) : vget_low_s16(s16)));
}

// Fixed-order horizontal sum: (l0+l2)+(l1+l3).
inline float hsum(float32x4_t v) {
    const float32x2_t p = vadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(p, 0) + vget_lane_f32(p, 1);
}

template <typename Format>
void blocks_dot_f32(const uint8_t* blocks, const uint8_t* scale_bytes, int64_t n_blocks, const float* const* x,
                     int n_tok, float* out) {
    const auto* scales = reinterpret_cast<const typename Format::Scale*>(scale_bytes);
    float32x4_t acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < n_blocks; ++g) {
        int8x16_t e0, e1;
        decode_block_i8<Format>(blocks + g * Format::kBlockBytes, &e0, &e1);
        float32x4_t w[8];
        for (int h = 0; h < 2; ++h) {
            const int8x16_t e = h ? e1 : e0;
            w[4 * h + 0] = widen_i8(vget_low_s8(e), false);
            w[4 * h + 1] = widen_i8(vget_low_s8(e), true);
            w[4 * h + 2] = widen_i8(vget_high_s8(e), false);
            w[4 * h + 3] = widen_i8(vget_high_s8(e), true);
        }
        const float sc = Format::int_scale(scales[g]);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Format::kBlock;
            float32x4_t s = vmulq_f32(w[0], vld1q_f32(xb));
            for (int i = 1; i < 8; ++i) s = vfmaq_f32(s, w[i], vld1q_f32(xb + 4 * i));
            acc[t] = vfmaq_n_f32(acc[t], s, sc);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum(acc[t]);
}

// The fast path: per block and token the exact int32 sum of weights times int16 codes, then the
// scalar path's own float steps (acc += float(sum) * (ws * d), block by block), so its results are
// the scalar kernels' to the bit whichever instructions made the integer sums.
//
// Integer sums, two ways. Baseline ARMv8 (Cortex-A53/A72, the Raspberry Pi 3 and 4): int8 weights
// widened to int16 and multiplied through vmlal_s16, codes in element order. With the dot-product
// extension (every phone core since Cortex-A55/A76, chosen from HWCAP at run time): codes split
// into signed bytes x = 256 hi + lo (Q16Block::kMax keeps both in [-128, 127]) and laid out per
// block as [hi of even elements | hi of odd | lo of even | lo of odd], 16 bytes each, which is how
// an MXFP4 block's low and high nibbles come out of the table lookup: four sdot per block and token.
#if defined(MOEMESH_DOTPROD)
// A row of int16 codes -> each block's four byte planes (the q16_layout of the dot-product table).
void activation_layout(int16_t* q, int64_t n_blocks) {
    for (int64_t g = 0; g < n_blocks; ++g) {
        int16_t* block = q + g * 32;
        int8_t planes[64];
        for (int e = 0; e < 32; ++e) {
            const int h = (int(block[e]) + 128) >> 8;
            planes[(e % 2) * 16 + e / 2] = int8_t(h);
            planes[32 + (e % 2) * 16 + e / 2] = int8_t(int(block[e]) - 256 * h);
        }
        std::memcpy(block, planes, sizeof planes);
    }
}

// A row of Q8 values -> per block [even elements | odd elements], as MXFP4 nibbles decode.
void q8_weight_layout(uint8_t* w, int64_t n_blocks) {
    for (int64_t g = 0; g < n_blocks; ++g) {
        uint8_t* block = w + g * 32, tmp[32];
        for (int e = 0; e < 32; ++e) tmp[(e % 2) * 16 + e / 2] = block[e];
        std::memcpy(block, tmp, sizeof tmp);
    }
}

// Partial sums of one block against a token's four planes: the lanes add up to its exact sum.
inline int32x4_t block_partials(int8x16_t even, int8x16_t odd, const int16_t* codes) {
    const int8_t* planes = reinterpret_cast<const int8_t*>(codes);
    int32x4_t hi = vdotq_s32(vdupq_n_s32(0), even, vld1q_s8(planes));
    hi = vdotq_s32(hi, odd, vld1q_s8(planes + 16));
    int32x4_t lo = vdotq_s32(vdupq_n_s32(0), even, vld1q_s8(planes + 32));
    lo = vdotq_s32(lo, odd, vld1q_s8(planes + 48));
    return vaddq_s32(vshlq_n_s32(hi, 8), lo);
}

// One 4-bit block's 32 integers as [even | odd] elements.
template <typename Format>
inline void nibble_weights(const uint8_t* codes, int8x16_t w[2]) {
    const int8x16_t lut = vld1q_s8(Format::kInts);
    const uint8x16_t b = vld1q_u8(codes);
    w[0] = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F)));
    w[1] = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
}
#else
// Partial sums of one block of int8 weights (elements 0..15, 16..31) against a token's codes.
inline int32x4_t block_partials(int8x16_t e0, int8x16_t e1, const int16_t* q) {
    const int16x8_t w[4] = {vmovl_s8(vget_low_s8(e0)), vmovl_s8(vget_high_s8(e0)),
                            vmovl_s8(vget_low_s8(e1)), vmovl_s8(vget_high_s8(e1))};
    int32x4_t s = vdupq_n_s32(0);
    for (int i = 0; i < 4; ++i) {
        const int16x8_t qi = vld1q_s16(q + 8 * i);
        s = vmlal_s16(s, vget_low_s16(w[i]), vget_low_s16(qi));
        s = vmlal_s16(s, vget_high_s16(w[i]), vget_high_s16(qi));
    }
    return s;
}

// One 4-bit block's 32 integers in element order.
template <typename Format>
inline void nibble_weights(const uint8_t* codes, int8x16_t w[2]) { decode_block_i8<Format>(codes, &w[0], &w[1]); }
#endif

template <typename Format>
struct NibbleRow {
    const uint8_t* blocks;
    const uint8_t* scales;
    void weights(int64_t g, int8x16_t w[2]) const {
        __builtin_prefetch(blocks + g * Format::kBlockBytes + kPrefetchBytes);
        nibble_weights<Format>(blocks + g * Format::kBlockBytes, w);
    }
    float scale(int64_t g) const { return Format::int_scale(reinterpret_cast<const typename Format::Scale*>(scales)[g]); }
    // Four blocks' scale(g + k).
    float32x4_t scales4(int64_t g) const {
        if constexpr (std::is_same_v<Format, Q4>) {
            return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(scales) + g)));
        } else {  // 2^(s-127) from bits (s = 0: the denormal 2^-127), halved
            uint32_t four;
            std::memcpy(&four, scales + g, 4);
            const uint32x4_t e = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(four))));
            const uint32x4_t bits = vbslq_u32(vceqzq_u32(e), vdupq_n_u32(0x00400000u), vshlq_n_u32(e, 23));
            return vmulq_n_f32(vreinterpretq_f32_u32(bits), 0.5f);
        }
    }
};

struct Q8Row {
    const int8_t* values;
    const uint16_t* scales;
    void weights(int64_t g, int8x16_t w[2]) const {
        __builtin_prefetch(values + g * Q8::kBlock + kPrefetchBytes);
        w[0] = vld1q_s8(values + g * Q8::kBlock);
        w[1] = vld1q_s8(values + g * Q8::kBlock + 16);
    }
    float scale(int64_t g) const { return f16_to_f32(scales[g]); }
    float32x4_t scales4(int64_t g) const { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scales + g))); }
};

// Per block and token acc += float(sum) * (ws * d), in block order: the scalar kernels' float
// steps, so the same bits. Four blocks at a time their sums, scales and products are vectors
// (lane k = block g + k) and only the additions go one by one. NT is a template parameter so the
// token loop unrolls.
template <int NT, typename Row>
void dot_q16_n(const Row& row, int64_t n_blocks, const Q16Row* x, float* out) {
    float acc[NT] = {};
    int64_t g = 0;
    for (; g + 4 <= n_blocks; g += 4) {
        int8x16_t w[4][2];
        for (int k = 0; k < 4; ++k) row.weights(g + k, w[k]);
        const float32x4_t ws = row.scales4(g);
        for (int t = 0; t < NT; ++t) {
            const int16_t* q = x[t].q + g * 32;
            const int32x4_t sums = vpaddq_s32(vpaddq_s32(block_partials(w[0][0], w[0][1], q),
                                                         block_partials(w[1][0], w[1][1], q + 32)),
                                              vpaddq_s32(block_partials(w[2][0], w[2][1], q + 64),
                                                         block_partials(w[3][0], w[3][1], q + 96)));
            const float32x4_t p = vmulq_f32(vcvtq_f32_s32(sums), vmulq_f32(ws, vld1q_f32(x[t].d + g)));
            acc[t] += vgetq_lane_f32(p, 0);
            acc[t] += vgetq_lane_f32(p, 1);
            acc[t] += vgetq_lane_f32(p, 2);
            acc[t] += vgetq_lane_f32(p, 3);
        }
    }
    for (; g < n_blocks; ++g) {
        int8x16_t w[2];
        row.weights(g, w);
        const float ws = row.scale(g);
        for (int t = 0; t < NT; ++t)
            acc[t] += float(vaddvq_s32(block_partials(w[0], w[1], x[t].q + g * 32))) * (ws * x[t].d[g]);
    }
    for (int t = 0; t < NT; ++t) out[t] = acc[t];
}

template <typename Format>
void nibbles_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                     float* out) {
    const NibbleRow<Format> row{blocks, scales};
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

void bf16_dot_row(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
    float32x4_t acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = vdupq_n_f32(0.f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t wf = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + i), 16));
        for (int t = 0; t < n_tok; ++t) acc[t] = vfmaq_f32(acc[t], wf, vld1q_f32(x[t] + i));
    }
    for (int t = 0; t < n_tok; ++t) {
        float s = hsum(acc[t]);
        for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[j]) * x[t][j];
        out[t] = s;
    }
}

void bf16_dot_f32(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, int n_tok, float* out) {
    for (int64_t r = 0; r < n_rows; ++r) bf16_dot_row(w + r * n, n, x, n_tok, out + r * n_tok);
}

void q8_dot_q16(const uint8_t* w, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok, float* out) {
    const Q8Row row{reinterpret_cast<const int8_t*>(w), reinterpret_cast<const uint16_t*>(scales)};
    with_token_count(n_tok, [&](auto nt) { dot_q16_n<decltype(nt)::value>(row, n_blocks, x, out); });
}

#if defined(MOEMESH_I8MM)
// Many tokens (prefill) with the int8 matrix multiply: smmla multiplies two rows' 8 weights by two
// tokens' 8 code bytes into a 2 x 2 tile of int32 sums, twice sdot's work per instruction. A
// block is 8 of them (4 slices of 8 for the hi bytes, 4 for the lo), giving each row and token its
// exact sum, then dot_q16_n's float steps per row and token in block order: the same bits as
// dot_q16 (and the scalar kernels). Activations are packed kTileTokens at a time: per block and
// token pair, its 4 planes (activation_layout) cut into 8-byte slices with the pair's two tokens
// side by side, as smmla reads them, then the pair's scales as [d0 d1 d0 d1].
constexpr int kPairs = kTileTokens / 2;
constexpr int64_t kPairBytes = 8 * 16;
constexpr int64_t kI8mmBlockBytes = kPairs * kPairBytes + kPairs * 4 * sizeof(float);

int64_t i8mm_group_bytes(WeightFormat, int64_t n_blocks) { return n_blocks * kI8mmBlockBytes; }

void i8mm_pack(WeightFormat, const Q16Row* x, int n_tok, int64_t n_blocks, int8_t* packed) {
    auto plane = [&](int t, int64_t b, int p) {  // tokens past n_tok: zeros
        return t < n_tok ? vld1q_s64(reinterpret_cast<const int64_t*>(x[t].q + b * 32) + 2 * p) : vdupq_n_s64(0);
    };
    for (int64_t b = 0; b < n_blocks; ++b) {
        int8_t* pb = packed + b * kI8mmBlockBytes;
        float* d = reinterpret_cast<float*>(pb + kPairs * kPairBytes);
        for (int pair = 0; pair < kPairs; ++pair) {
            const int t0 = 2 * pair, t1 = t0 + 1;
            int64_t* slices = reinterpret_cast<int64_t*>(pb + pair * kPairBytes);
            for (int p = 0; p < 4; ++p) {
                const int64x2_t a = plane(t0, b, p), c = plane(t1, b, p);
                vst1q_s64(slices + 4 * p, vzip1q_s64(a, c));
                vst1q_s64(slices + 4 * p + 2, vzip2q_s64(a, c));
            }
            const float d0 = t0 < n_tok ? x[t0].d[b] : 0.f, d1 = t1 < n_tok ? x[t1].d[b] : 0.f;
            const float pair_scales[4] = {d0, d1, d0, d1};
            std::memcpy(d + 4 * pair, pair_scales, sizeof pair_scales);
        }
    }
}

// Rows a and b (b absent: zero weights, results dropped) against one packed token group:
// out_a[t], out_b[t] for its kTileTokens tokens.
template <typename Row>
void i8mm_row_pair(const Row& a, const Row* b, int64_t n_blocks, const int8_t* packed, float* out_a, float* out_b) {
    float32x4_t acc[kPairs];  // lanes (a, t0) (a, t1) (b, t0) (b, t1) of token pair t0 = 2 pair
    for (auto& v : acc) v = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < n_blocks; ++g) {
        int8x16_t wa[2], wb[2] = {vdupq_n_s8(0), vdupq_n_s8(0)};
        a.weights(g, wa);
        if (b) b->weights(g, wb);
        // Slices [a's 8 | b's 8] of the even elements (0, 1) and the odd ones (2, 3).
        int8x16_t w[4];
        for (int h = 0; h < 2; ++h) {
            const int64x2_t ra = vreinterpretq_s64_s8(wa[h]), rb = vreinterpretq_s64_s8(wb[h]);
            w[2 * h] = vreinterpretq_s8_s64(vzip1q_s64(ra, rb));
            w[2 * h + 1] = vreinterpretq_s8_s64(vzip2q_s64(ra, rb));
        }
        const float wsa = a.scale(g), wsb = b ? b->scale(g) : 0.f;
        const float32x4_t ws = {wsa, wsa, wsb, wsb};
        const int8_t* pb = packed + g * kI8mmBlockBytes;
        const float* d = reinterpret_cast<const float*>(pb + kPairs * kPairBytes);
        for (int pair = 0; pair < kPairs; ++pair) {
            const int8_t* B = pb + pair * kPairBytes;
            int32x4_t hi = vmmlaq_s32(vdupq_n_s32(0), w[0], vld1q_s8(B));
            int32x4_t lo = vmmlaq_s32(vdupq_n_s32(0), w[0], vld1q_s8(B + 64));
            for (int i = 1; i < 4; ++i) {
                hi = vmmlaq_s32(hi, w[i], vld1q_s8(B + 16 * i));
                lo = vmmlaq_s32(lo, w[i], vld1q_s8(B + 64 + 16 * i));
            }
            const int32x4_t sums = vaddq_s32(vshlq_n_s32(hi, 8), lo);
            acc[pair] = vaddq_f32(acc[pair], vmulq_f32(vcvtq_f32_s32(sums), vmulq_f32(ws, vld1q_f32(d + 4 * pair))));
        }
    }
    for (int pair = 0; pair < kPairs; ++pair) {
        vst1_f32(out_a + 2 * pair, vget_low_f32(acc[pair]));
        if (out_b) vst1_f32(out_b + 2 * pair, vget_high_f32(acc[pair]));
    }
}

// out[(g * n_rows + r) * kTileTokens + t] for every row and packed token group; row(r) gives row r.
template <typename RowOf>
void i8mm_tiles(const RowOf& row, int64_t n_blocks, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    for (int64_t g = 0; g < n_groups; ++g) {
        const int8_t* pg = packed + g * n_blocks * kI8mmBlockBytes;
        float* og = out + g * n_rows * kTileTokens;
        for (int64_t r = 0; r < n_rows; r += 2) {
            const auto a = row(r);
            if (r + 1 < n_rows) {
                const auto b = row(r + 1);
                i8mm_row_pair(a, &b, n_blocks, pg, og + r * kTileTokens, og + (r + 1) * kTileTokens);
            } else {
                i8mm_row_pair(a, static_cast<const decltype(a)*>(nullptr), n_blocks, pg, og + r * kTileTokens, nullptr);
            }
        }
    }
}

template <typename Format>
void nibbles_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                      const int8_t* packed, int64_t n_groups, float* out) {
    const int64_t scale_bytes = n_blocks * int64_t(sizeof(typename Format::Scale));
    i8mm_tiles([&](int64_t r) { return NibbleRow<Format>{blocks + r * n_blocks * Format::kBlockBytes, scales + r * scale_bytes}; },
               n_blocks, n_rows, packed, n_groups, out);
}

void q8_tile_q16(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, int64_t n_rows, const int8_t* packed,
                 int64_t n_groups, float* out) {
    i8mm_tiles([&](int64_t r) {
        return Q8Row{reinterpret_cast<const int8_t*>(values) + r * n_blocks * Q8::kBlock,
                     reinterpret_cast<const uint16_t*>(scales) + r * n_blocks};
    }, n_blocks, n_rows, packed, n_groups, out);
}
#endif

}  // namespace

#if defined(MOEMESH_I8MM)
const KernelTable kNeonI8mmKernels = {"neon",
                                      {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, nibbles_tile_q16<Mxfp4>},
                                       {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, nibbles_tile_q16<Q4>},
                                       {blocks_dot_f32<Q8>, q8_dot_q16, q8_weight_layout, q8_tile_q16}},
                                      activation_layout,
                                      bf16_dot_f32,
                                      nullptr,
                                      nullptr,
                                      nullptr,
                                      i8mm_group_bytes,
                                      i8mm_pack};
#elif defined(MOEMESH_DOTPROD)
const KernelTable kNeonDotKernels = {"neon",
                                     {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, nullptr},
                                      {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, nullptr},
                                      {blocks_dot_f32<Q8>, q8_dot_q16, q8_weight_layout, nullptr}},
                                     activation_layout,
                                     bf16_dot_f32};
#else
const KernelTable kNeonKernels = {"neon",
                                  {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, nullptr},
                                   {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, nullptr},
                                   {blocks_dot_f32<Q8>, q8_dot_q16, nullptr, nullptr}},
                                  nullptr,
                                  bf16_dot_f32};
#endif

}  // namespace moemesh
