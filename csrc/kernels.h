// The per-ISA primitive table: the only code that differs between scalar, AVX2, AVX-512 and NEON.
// Each primitive computes full dot products for one weight row against up to kMaxTokens activation
// rows, accumulating every token in the same fixed order whatever the grouping, so a result never
// depends on how tokens or rows were split across threads or requests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "formats.h"

namespace moemesh {

// Activation rows sharing one pass over a weight row. 4 tokens' activations stay in L1 while a
// task's rows go by (their q16 planes are 23 KB at gpt-oss's 2880); with 8 they were re-read from
// L2 for every row: expert prefill 130 -> 185 GFLOP/s, q8 123 -> 158 (AVX-512, 2 threads).
constexpr int kMaxTokens = 4;

// Calls fn(std::integral_constant<int, n_tok>{}) for n_tok in [1, kMaxTokens]: a runtime token
// count -> a kernel instantiated for it, so every token's accumulators stay in registers. (Each ISA
// file calls it with its own lambdas, so no two files share an instantiation.)
template <typename Fn, int... N>
void with_token_count(int n_tok, const Fn& fn, std::integer_sequence<int, N...>) {
    ((n_tok == N + 1 ? fn(std::integral_constant<int, N + 1>{}) : void()), ...);
}
template <typename Fn>
void with_token_count(int n_tok, const Fn& fn) {
    with_token_count(n_tok, fn, std::make_integer_sequence<int, kMaxTokens>{});
}

// How far ahead weight streams are prefetched (kernels, and the bandwidth yardstick that must read
// as well as they do). Weights come from a file mapping with 4 KiB pages, where hardware
// prefetchers stop at every page edge; touching 512 bytes ahead keeps the stream going (bf16
// unembedding: 20 -> 31 GB/s). A second, far prefetch into L2 covers the memory latency a single
// core otherwise waits out (a KVM guest's core keeps few misses in flight): MXFP4 decode 12 -> 18
// GB/s on one core; 8 KiB ahead measured best for the 2-thread expert decode (4 KiB: 22.6, 8 KiB:
// 23.5, 32 KiB: 22.9 GB/s).
constexpr int kPrefetchBytes = 512;
constexpr int kPrefetchFarBytes = 8192;

// Activations of the `fast` precision: int16 per 32-block with one fp32 scale per block.
// q: codes, d: scale per 32-block, s: sum of each block's codes (what the AVX-512 path needs to
// take its weights' offset back out).
struct Q16Row {
    const int16_t* q;
    const float* d;
    const int32_t* s;
};

// Tokens per step of a matrix-unit path (AMX: one tile's 16 columns).
constexpr int kTileTokens = 16;

// One weight format's kernels on one ISA: a cell of the format table (formats.h's kFormatInfo
// gives the row: block bytes, scale bytes). Weight rows are `values` (packed codes, or int8
// values) with one scale per 32-block, each as the format stores them.
struct FormatKernels {
    // out[t] = sum_k W[k] * x[t][k] over one row of n_blocks blocks (values as stored), fp32
    // activations (the exact precision).
    void (*dot_f32)(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, const float* const* x, int n_tok,
                    float* out);
    // The same with int16-quantized activations (exact integer sums per block), laid out by
    // q16_layout; values in weight_layout's order.
    void (*dot_q16)(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                    float* out);
    // The order this ISA's dot_q16 reads a row's values in, applied once to a copy (nullptr: as stored).
    void (*weight_layout)(uint8_t* values, int64_t n_blocks);
    // Optional (nullptr when absent): a matrix-unit path for many tokens, bit-identical to dot_q16.
    // out[(g * n_rows + r) * kTileTokens + t] = sum_k W[r][k] * x[g][t][k] for n_rows consecutive
    // rows and n_groups consecutive groups packed by tile_pack for this format.
    void (*tile_q16)(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                     const int8_t* packed, int64_t n_groups, float* out);
};

struct KernelTable {
    const char* name;
    // By WeightFormat.
    FormatKernels formats[kWeightFormats];
    // Reorders one row of int16 activations in place into the order this ISA's dot_q16 kernels
    // decode weights in (nullptr: natural element order).
    void (*q16_layout)(int16_t* q, int64_t n_blocks);
    // out[r * n_tok + t] = sum_k W[r][k] * x[t][k], W n_rows consecutive bf16 rows of length n (any
    // n), x laid out by bf16_layout. Each row gets the same bits whatever n_rows is.
    void (*bf16_dot_f32)(const uint16_t* w, int64_t n_rows, int64_t n, const float* const* x, int n_tok,
                         float* out);
    // Reorders one row of fp32 activations (length n) in place into the order bf16_dot_f32 reads
    // them in (nullptr: natural order).
    void (*bf16_layout)(float* x, int64_t n);
    // Optional (nullptr: attention.h's portable one): scaled scores with their max m -> attention
    // weights in place; the same bits as attention::softmax_row.
    void (*softmax_row)(float* s, int64_t S, float sink, float m);
    // Optional (nullptr: attention.h's portable one): one query's heads that share a kv head, d a
    // multiple of 16 up to attention::kMaxHeadDim, keys and values `stride` floats apart; the same
    // bits as attention::attend_group.
    void (*attend_group)(const float* q, int group, const float* k, const float* v, int64_t S, int64_t stride,
                         int64_t d, const float* sinks, const int64_t* k_pos, int64_t q_pos, int64_t window,
                         float sqrt_d, float* scores, float* out);

    // With any FormatKernels::tile_q16: bytes of one packed group of kTileTokens tokens'
    // activations over n_blocks blocks, and the packing of up to kTileTokens laid-out activation
    // rows (the rest are zeros) for one weight format.
    int64_t (*tile_group_bytes)(WeightFormat format, int64_t n_blocks);
    void (*tile_pack)(WeightFormat format, const Q16Row* x, int n_tok, int64_t n_blocks, int8_t* packed);
    // The bf16 matmul for many tokens (K a multiple of 32, n_rows of 64): packed groups of
    // kTileTokens fp32 activation rows, out[(g * n_rows + r) * kTileTokens + t]. Its sums are
    // rounded in the matrix unit's order, not bf16_dot_f32's: exact within tolerance, not bit for bit.
    int64_t (*bf16_tile_bytes)(int64_t K);
    void (*bf16_tile_pack)(const float* const* x, int n_tok, int64_t K, int8_t* packed);
    void (*bf16_tile_f32)(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups,
                          float* out);

    const FormatKernels& of(WeightFormat f) const { return formats[int(f)]; }
};

// Rows per step of bf16_tile_f32.
constexpr int64_t kBf16TileRows = 64;

// Storage for at least n elements of a scratch buffer, which never shrinks: the sizes change from
// call to call, and resize() value-initialises whatever it grows by (memsets that were 2.7% of a
// Qwen3 prefill when a smaller call came between two larger ones).
template <typename T>
T* scratch(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

// n elements of v's storage from a 64-byte boundary: a tile row that straddles two cache lines
// loads at half speed.
template <typename T>
T* cache_aligned(std::vector<T>& v, std::size_t n) {
    scratch(v, n + 64 / sizeof(T));
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

const KernelTable* kernel_table(Isa isa);  // nullptr when not compiled in or not supported by the CPU
std::vector<const KernelTable*> all_kernel_tables();  // every table this CPU runs, variants included
const char* table_variant(const KernelTable* kt);  // "vnni", "vbmi", "amx", "dotprod" or "" (the ISA's base build)
Isa best_isa();
Isa active_isa();                          // best_isa() unless MOEMESH_ISA forces one
const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* out);

extern const KernelTable kScalarKernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx2VnniKernels;  // the same path with AVX-VNNI dot products (if built)
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512VbmiKernels;  // the same path with VBMI byte permutes
#if defined(MOEMESH_AMX)
extern const KernelTable kAvx512AmxKernels;   // the VBMI build plus AMX tiles for many tokens
bool amx_usable();                            // the CPU has AMX-INT8/BF16 and Linux granted the tile state
#endif
#endif
#if defined(__aarch64__)
extern const KernelTable kNeonKernels;
extern const KernelTable kNeonDotKernels;  // the same path with the dot-product instructions
extern const KernelTable kNeonI8mmKernels;  // the sdot build plus smmla tiles for many tokens (if built)
#endif

}  // namespace moemesh
