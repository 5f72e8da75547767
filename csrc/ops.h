// Layer-level operations built from the per-ISA primitives: matmuls over quantized and bf16 weights and
// the fused MoE expert FFN. Buffers in, buffers out: no Python, no files, no configs.
// Callers (module.cpp) have already validated every shape and index.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace moemesh {

enum class Precision { Exact = 0, Fast = 1 };

// The fast precision's activation blocks (n a multiple of 32): q16_quantize matches numpy's
// expert_node.formats.q16_quantize bit for bit; q16_dequantize its inverse.
void q16_quantize(const float* x, int64_t n, int16_t* q, float* d);
void q16_dequantize(const int16_t* q, const float* d, int64_t n, float* out);
// The same over a whole buffer on the thread pool (not from inside a parallel_for).
void q16_quantize_parallel(const float* x, int64_t n, int16_t* q, float* d);
void q16_dequantize_parallel(const int16_t* q, const float* d, int64_t n, float* out);
// q16_dequantize(q16_quantize(x)) in one pass without the codes (what crossing the expert boundary
// does to activations).
void q16_round_parallel(const float* x, int64_t n, float* out);

// out[r, :] = dequantized MXFP4 row r (rows x n_blocks*32).
void mxfp4_dequant(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t n_blocks,
                   float* out);

// y[T, N] = x[T, K] . W[N, K]^T (+ bias[N]); W bf16, bias bf16 or null.
void bf16_matmul(const KernelTable& kt, const float* x, int64_t T, int64_t K, const uint16_t* w,
                 int64_t N, const uint16_t* bias, float* y);

// bf16 rows [N, K] (K a multiple of 32) -> Q8 values [N, K] int8 and fp16 scales [N, K/32], as
// formats.q8_quantize; q8_copy then puts the values in this ISA's layout (the dense 8-bit copy).
void q8_quantize(const uint16_t* w, int64_t N, int64_t K, int8_t* values, uint16_t* scales);
void q8_copy(const KernelTable& kt, const uint16_t* w, int64_t N, int64_t K, int8_t* values, uint16_t* scales);
// bf16 rows [N, K] -> MXFP4 blocks [N, K/32, 16] and scales [N, K/32], as formats.mxfp4_quantize.
void mxfp4_quantize(const uint16_t* w, int64_t N, int64_t K, uint8_t* blocks, uint8_t* scales);
// bf16 rows [N, K] -> Q4 blocks [N, K/32, 16] and fp16 scales [N, K/32], as formats.q4_quantize.
void q4_quantize(const uint16_t* w, int64_t N, int64_t K, uint8_t* blocks, uint16_t* scales);
// Puts `rows` rows of a format's stored values in the order this ISA's kernels read (in place;
// nothing to do for most formats).
void weight_layout(const KernelTable& kt, WeightFormat f, uint8_t* values, int64_t rows, int64_t n_blocks);

// y[T, N] = x[T, K] . W[N, K]^T over a matrix in one weight format (K a multiple of 32): values
// as stored with exact precision (fp32 activations), in the ISA's weight_layout with fast (int16
// activation blocks). The dense 8-bit copy is Q8.
void quant_matmul(const KernelTable& kt, Precision precision, WeightFormat format, const float* x, int64_t T,
                  int64_t K, const uint8_t* values, const uint8_t* scales, int64_t N, float* y);

struct MoeWeights {
    int64_t n_experts, hidden, inter;  // E, H, I  (gate_up has 2I rows over H, down has H rows over I)
    WeightFormat format;               // of both projections (values in weight_layout's order)
    const uint8_t* gate_up_values;     // [E, 2I, H/32, block bytes]
    const uint8_t* gate_up_scales;     // [E, 2I, H/32] scales
    const uint16_t* gate_up_bias;      // [E, 2I] bf16, rows interleaved gate/up; null: none
    const uint8_t* down_values;        // [E, H, I/32, block bytes]
    const uint8_t* down_scales;        // [E, H, I/32] scales
    const uint16_t* down_bias;         // [E, H] bf16; null: none
    float swiglu_alpha, swiglu_limit;
    bool clamped = true;  // gpt-oss's clamped SwiGLU (alpha, limit, up + 1); false: the plain silu(gate) * up
};

// For every assignment (t, slot) with expert e = ids[t, slot] (or skipped when e < 0):
//   out[t, slot, :] = down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e  (w.clamped: which SwiGLU)
// Unweighted: the caller combines slots in a fixed order, so local and remote sums agree bit for bit.
void moe_experts(const KernelTable& kt, Precision precision, const MoeWeights& w, const float* x,
                 int64_t T, const int32_t* ids, int64_t k, float* out);

}  // namespace moemesh

namespace moemesh {
// Attention weights in place, rows [H, T] of scores [H, T, S] (raw q.k of query head h): each row
// divided by sqrt_d, keys a query cannot see dropped (k_pos > q_pos, or, with window > 0,
// k_pos <= q_pos - window), then softmax over the visible keys and the head's sink logit, which
// joins only the denominator (the numpy reference's softmax_with_sinks, with a polynomial exp).
void attention_softmax(const KernelTable& kt, float* scores, int64_t H, int64_t T, int64_t S, const float* sinks,
                       const int64_t* q_pos, const int64_t* k_pos, int64_t window, float sqrt_d);

// Attention of T queries q [T, nq, d] at positions q_pos against keys and values [S, nkv, d] at
// positions k_pos (query head h reads kv head h / (nq / nkv)), masked as attention_softmax masks,
// each head's sink in the softmax denominator -> out [T, nq, d] (d a multiple of 16 up to 256).
// One task per query and kv head.
void attend(const KernelTable& kt, const float* q, int64_t T, int64_t nq, int64_t d, const float* k, const float* v,
            int64_t S, int64_t nkv, const float* sinks, const int64_t* q_pos, const int64_t* k_pos, int64_t window,
            float sqrt_d, float* out);

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for rows t of x [T, H] (the reference's rmsnorm,
// with the squares summed in double in a fixed order: within an ulp of numpy's float32 mean).
void rmsnorm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* out);

// RoPE's half-split rotation in place on x [T, heads, d]: element i pairs with i + d/2,
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with cos, sin [T, d/2] (the reference's float ops).
void rope_rotate(float* x, int64_t T, int64_t heads, int64_t d, const float* cos, const float* sin);

// The router's choice for rows t of logits [T, E]: ids[t] the k largest (ties: lower id first),
// weights[t] their softmax (the reference's router_topk; exp from libm).
void router_topk(const float* logits, int64_t T, int64_t E, int64_t k, int32_t* ids, float* weights);

// out[t] = x[t] + sum over slots s in order of outputs[t, s] * weights[t, s] (the reference's
// x + combine_experts: the same float operations, the same bits).
void add_experts(const float* x, const float* outputs, const float* weights, int64_t T, int64_t k, int64_t H,
                 float* out);

// Reads every byte of buf once with all threads (a STREAM-like read for benchmarks), with the
// kernels' prefetches or without; returns an xor checksum so the reads cannot be optimised away.
uint64_t stream_read(const uint8_t* buf, int64_t n_bytes, bool prefetch);
// STREAM's triad, a = b + scalar * c, with all threads: the bandwidth yardstick's third reading.
void stream_triad(float* a, const float* b, const float* c, float scalar, int64_t n);
}  // namespace moemesh
