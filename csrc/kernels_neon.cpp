// NEON kernels for AArch64 (phones, Raspberry Pi). Baseline ARMv8 only, so the same build runs on
// a Cortex-A72 Pi: int16 products go through vmlal_s16.
#include <arm_neon.h>

#include "formats.h"
#include "kernels.h"

namespace moemesh {
namespace {

// 16 code bytes -> 32 doubled int8 values in element order (e0: elements 0..15, e1: 16..31).
inline void decode_block_i8(const uint8_t* codes, int8x16_t* e0, int8x16_t* e1) {
    const int8x16_t lut = vld1q_s8(Mxfp4::kDoubled);
    const uint8x16_t b = vld1q_u8(codes);
    const int8x16_t even = vqtbl1q_s8(lut, vandq_u8(b, vdupq_n_u8(0x0F)));
    const int8x16_t odd = vqtbl1q_s8(lut, vshrq_n_u8(b, 4));
    *e0 = vzip1q_s8(even, odd);
    *e1 = vzip2q_s8(even, odd);
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

void mxfp4_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
                   const float* const* x, int n_tok, float* out) {
    float32x4_t acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < n_blocks; ++g) {
        int8x16_t e0, e1;
        decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        float32x4_t w[8];
        for (int h = 0; h < 2; ++h) {
            const int8x16_t e = h ? e1 : e0;
            w[4 * h + 0] = widen_i8(vget_low_s8(e), false);
            w[4 * h + 1] = widen_i8(vget_low_s8(e), true);
            w[4 * h + 2] = widen_i8(vget_high_s8(e), false);
            w[4 * h + 3] = widen_i8(vget_high_s8(e), true);
        }
        const float sc = Mxfp4::scale(scales[g]) * 0.5f;
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Mxfp4::kBlock;
            float32x4_t s = vmulq_f32(w[0], vld1q_f32(xb));
            for (int i = 1; i < 8; ++i) s = vfmaq_f32(s, w[i], vld1q_f32(xb + 4 * i));
            acc[t] = vfmaq_n_f32(acc[t], s, sc);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum(acc[t]);
}

// One block of 32 int8 weights (e0: elements 0..15, e1: 16..31) with scale ws against every token's
// int16 block g: exact int32 sums through vmlal_s16, then one FMA per token.
inline void accumulate_q16_block(int8x16_t e0, int8x16_t e1, float ws, const Q16Row* x, int n_tok, int64_t g,
                                 float32x4_t* acc) {
    const int16x8_t w[4] = {vmovl_s8(vget_low_s8(e0)), vmovl_s8(vget_high_s8(e0)),
                            vmovl_s8(vget_low_s8(e1)), vmovl_s8(vget_high_s8(e1))};
    for (int t = 0; t < n_tok; ++t) {
        const int16_t* q = x[t].q + g * 32;
        int32x4_t s = vdupq_n_s32(0);
        for (int i = 0; i < 4; ++i) {
            const int16x8_t qi = vld1q_s16(q + 8 * i);
            s = vmlal_s16(s, vget_low_s16(w[i]), vget_low_s16(qi));
            s = vmlal_s16(s, vget_high_s16(w[i]), vget_high_s16(qi));
        }
        acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s), ws * x[t].d[g]);
    }
}

void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    float32x4_t acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < n_blocks; ++g) {
        int8x16_t e0, e1;
        decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        accumulate_q16_block(e0, e1, Mxfp4::scale(scales[g]) * 0.5f, x, n_tok, g, acc);
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum(acc[t]);
}

void bf16_dot_f32(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
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

void q8_dot_q16(const int8_t* w, const uint16_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                float* out) {
    float32x4_t acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < n_blocks; ++g) {
        const float ws = vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(scales[g]))), 0);
        accumulate_q16_block(vld1q_s8(w + g * Q8::kBlock), vld1q_s8(w + g * Q8::kBlock + 16), ws, x, n_tok, g, acc);
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum(acc[t]);
}

}  // namespace

const KernelTable kNeonKernels = {"neon", mxfp4_dot_f32, mxfp4_dot_q16, nullptr, bf16_dot_f32, q8_dot_q16, nullptr};

}  // namespace moemesh
