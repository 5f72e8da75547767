// Portable scalar kernels: the native twin of the numpy reference, for any CPU.
#include <type_traits>

#include "formats.h"
#include "kernels.h"

namespace moemesh {
namespace {

// A block's weights: Format::kInts[code] * Format::int_scale(scale) for the 4-bit formats (MXFP4,
// Q4), value * scale for Q8 (natural order).
template <typename Format>
inline void decode_block(const uint8_t* codes, typename Format::Scale scale, float* out) {
    const float s = Format::int_scale(scale);
    if constexpr (std::is_same_v<Format, Q8>) {
        for (int i = 0; i < Q8::kBlock; ++i) out[i] = float(int8_t(codes[i])) * s;
    } else {
        for (int j = 0; j < Format::kBlockBytes; ++j) {
            out[2 * j] = float(Format::kInts[codes[j] & 0x0F]) * s;
            out[2 * j + 1] = float(Format::kInts[codes[j] >> 4]) * s;
        }
    }
}

template <typename Format>
void blocks_dot_f32(const uint8_t* blocks, const uint8_t* scale_bytes, int64_t n_blocks, const float* const* x,
                     int n_tok, float* out) {
    const auto* scales = reinterpret_cast<const typename Format::Scale*>(scale_bytes);
    float w[Format::kBlock];
    float acc[kMaxTokens] = {};
    for (int64_t g = 0; g < n_blocks; ++g) {
        decode_block<Format>(blocks + g * Format::kBlockBytes, scales[g], w);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Format::kBlock;
            float s = 0.f;
            for (int i = 0; i < Format::kBlock; ++i) s += w[i] * xb[i];
            acc[t] += s;
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = acc[t];
}

// Per block and token the exact integer sum of weights times codes, then acc += float(sum) *
// (int_scale * d) in block order: the float steps every fast path repeats (NEON to the bit).
template <typename Format>
void nibbles_dot_q16(const uint8_t* blocks, const uint8_t* scale_bytes, int64_t n_blocks, const Q16Row* x,
                     int n_tok, float* out) {
    const auto* scales = reinterpret_cast<const typename Format::Scale*>(scale_bytes);
    float acc[kMaxTokens] = {};
    for (int64_t g = 0; g < n_blocks; ++g) {
        const uint8_t* c = blocks + g * Format::kBlockBytes;
        const float ws = Format::int_scale(scales[g]);
        for (int t = 0; t < n_tok; ++t) {
            const int16_t* q = x[t].q + g * Format::kBlock;
            int32_t s = 0;
            for (int j = 0; j < Format::kBlockBytes; ++j) {
                s += int32_t(Format::kInts[c[j] & 0x0F]) * q[2 * j];
                s += int32_t(Format::kInts[c[j] >> 4]) * q[2 * j + 1];
            }
            acc[t] += float(s) * (ws * x[t].d[g]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = acc[t];
}

void bf16_dot_f32(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, int n_tok, float* out) {
    for (int64_t r = 0; r < n_rows; ++r)
        for (int t = 0; t < n_tok; ++t) {
            float s = 0.f;
            for (int64_t i = 0; i < n; ++i) s += bf16_to_f32(w[r * n + i]) * x[t][i];
            out[r * n_tok + t] = s;
        }
}

void q8_dot_q16(const uint8_t* values, const uint8_t* scale_bytes, int64_t n_blocks, const Q16Row* x, int n_tok,
                float* out) {
    const auto* w = reinterpret_cast<const int8_t*>(values);
    const auto* scales = reinterpret_cast<const uint16_t*>(scale_bytes);
    float acc[kMaxTokens] = {};
    for (int64_t g = 0; g < n_blocks; ++g) {
        const int8_t* wb = w + g * Q8::kBlock;
        const float ws = f16_to_f32(scales[g]);
        for (int t = 0; t < n_tok; ++t) {
            const int16_t* q = x[t].q + g * Q8::kBlock;
            int32_t s = 0;
            for (int i = 0; i < Q8::kBlock; ++i) s += int32_t(wb[i]) * q[i];
            acc[t] += float(s) * (ws * x[t].d[g]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = acc[t];
}

}  // namespace

const KernelTable kScalarKernels = {
    "scalar",
    {{blocks_dot_f32<Mxfp4>, nibbles_dot_q16<Mxfp4>, nullptr, nullptr},
     {blocks_dot_f32<Q4>, nibbles_dot_q16<Q4>, nullptr, nullptr},
     {blocks_dot_f32<Q8>, q8_dot_q16, nullptr, nullptr}},
    nullptr,
    bf16_dot_f32};

}  // namespace moemesh
