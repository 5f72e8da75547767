// Attention's float math, portable and header-only: the softmax with a sink and one query's heads
// that share a kv head (attend_group), which the AVX-512 kernels reproduce operation for operation
// (kernels_avx512.cpp), so every path gives the same bits. No fused multiply-adds anywhere (the
// build disables contraction): each product is rounded before it is added, as here.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "formats.h"

namespace moemesh {
namespace attention {

// e^x for x <= 0 within a few ulp, in plain float operations a vector kernel can repeat lane by
// lane (a libm call cannot be): 2^n from the exponent bits times a degree-6 polynomial on a
// Cody-Waite reduced argument. Arguments below -87.3 (e^x under the smallest normal float) give 0.
inline float exp_nonpositive(float x) {
    const float xc = std::max(x, -87.f);
    const float n = round_half_even(xc * 1.44269504f);
    const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.38888889e-3f;  // 1/720
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = (int32_t(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, 4);
    return x < -87.3f ? 0.f : p * two_n;
}

// Query heads per kv head that attend_group serves (grouped-query attention uses up to 8), and
// head dimensions: multiples of 16 up to kMaxHeadDim.
constexpr int kMaxGroup = 16;
constexpr int kMaxHeadDim = 256;

// Calls fn(std::integral_constant<int, d>{}) for a supported head dimension d (a constant, so each
// key's dot product is whole vectors); false when d is not supported.
template <typename Fn, int... I>
bool with_head_dim(int64_t d, const Fn& fn, std::integer_sequence<int, I...>) {
    return ((d == 16 * (I + 1) ? (fn(std::integral_constant<int, 16 * (I + 1)>{}), true) : false) || ...);
}
template <typename Fn>
bool with_head_dim(int64_t d, const Fn& fn) {
    return with_head_dim(d, fn, std::make_integer_sequence<int, kMaxHeadDim / 16>{});
}

// A key at kp is visible to a query at qp: causal, and inside the window when window > 0.
inline bool key_visible(int64_t kp, int64_t qp, int64_t window) {
    return kp <= qp && (window <= 0 || kp > qp - window);
}

// The denominator's fixed order over 8 partial sums and the sink's term.
inline float softmax_denominator(const float* part, float sink, float m) {
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
           exp_nonpositive(sink - m);
}

// Partial sums of a softmax denominator: element j adds to sum j % kParts, so keys may be passed
// from any multiple of kParts on and with any masked keys after them (each adds an exact zero)
// without changing a bit: a decoded token and the same token in a verified chunk, whose key arrays
// differ only there, get the same weights (ops.cpp's attend, coordinator's KVCache).
constexpr int kParts = 8;

// Scaled scores s[0, S) (masked keys -inf), whose max together with the sink is m -> attention
// weights in place: e^(s - m) / (their sum + e^(sink - m)); element j adds to partial sum j % 8.
inline void softmax_row(float* s, int64_t S, float sink, float m) {
    float part[kParts] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + kParts <= S; j += kParts)
        for (int i = 0; i < kParts; ++i) part[i] += s[j + i] = exp_nonpositive(s[j + i] - m);
    for (; j < S; ++j) part[j % kParts] += s[j] = exp_nonpositive(s[j] - m);
    const float z = softmax_denominator(part, sink, m);
    for (int64_t i = 0; i < S; ++i) s[i] /= z;
}

// q . k over D floats, summed in order (what a vector kernel computes for 16 keys at once, one per
// lane).
template <int D>
inline float dot(const float* q, const float* k) {
    float s = 0.f;
    for (int i = 0; i < D; ++i) s += q[i] * k[i];
    return s;
}

// One query's heads q[group][D] that share a kv head, over S keys and values
// `stride` floats apart (each key read once for the whole group): per head, scores q.k / sqrt_d
// (masked keys -inf) into scores[h][S], softmax with its sink, out[h] = sum_j p_j v_j in key order.
template <int D>
void attend_group(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride,
                  const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window, float sqrt_d,
                  float* scores, float* out) {
    for (int h = 0; h < group; ++h) {
        float m = sinks[h];
        float* sh = scores + h * S;
        for (int64_t j = 0; j < S; ++j) {
            sh[j] = key_visible(k_pos[j], q_pos, window) ? dot<D>(q + h * D, k + j * stride) / sqrt_d : -INFINITY;
            m = std::max(m, sh[j]);
        }
        softmax_row(sh, S, sinks[h], m);
    }
    std::fill(out, out + group * D, 0.f);
    for (int64_t j = 0; j < S; ++j) {
        if (!key_visible(k_pos[j], q_pos, window)) continue;
        for (int h = 0; h < group; ++h)
            for (int i = 0; i < D; ++i) out[h * D + i] += scores[h * S + j] * v[j * stride + i];
    }
}

}  // namespace attention
}  // namespace moemesh
