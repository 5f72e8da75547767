// Portable scalar kernels: the native twin of the numpy reference, for any CPU.
#include "formats.h"
#include "kernels.h"

namespace moemesh {
namespace {

void mxfp4_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
                   const float* const* x, int n_tok, float* out) {
    float w[Mxfp4::kBlock];
    float acc[kMaxTokens] = {};
    for (int64_t g = 0; g < n_blocks; ++g) {
        Mxfp4::decode_block(blocks + g * Mxfp4::kBlockBytes, scales[g], w);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Mxfp4::kBlock;
            float s = 0.f;
            for (int i = 0; i < Mxfp4::kBlock; ++i) s += w[i] * xb[i];
            acc[t] += s;
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = acc[t];
}

void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    float acc[kMaxTokens] = {};
    for (int64_t g = 0; g < n_blocks; ++g) {
        const uint8_t* c = blocks + g * Mxfp4::kBlockBytes;
        const float ws = Mxfp4::scale(scales[g]) * 0.5f;
        for (int t = 0; t < n_tok; ++t) {
            const int16_t* q = x[t].q + g * Mxfp4::kBlock;
            int32_t s = 0;
            for (int j = 0; j < Mxfp4::kBlockBytes; ++j) {
                s += int32_t(Mxfp4::kDoubled[c[j] & 0x0F]) * q[2 * j];
                s += int32_t(Mxfp4::kDoubled[c[j] >> 4]) * q[2 * j + 1];
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

void q8_dot_q16(const int8_t* w, const uint16_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                float* out) {
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

const KernelTable kScalarKernels = {"scalar", mxfp4_dot_f32, mxfp4_dot_q16, nullptr, bf16_dot_f32, q8_dot_q16,
                                    nullptr};

}  // namespace moemesh
