// AVX-512 kernels (F/BW/VL + VNNI; compiled with those flags, selected only when the CPU has them).
// fp32 path: a block's 32 weights are two zmm registers. int16 path: 4 blocks' weights in four zmm
// of int16 and VNNI vpdpwssd per token (exact int32 block sums).
#include <immintrin.h>

#include <cstring>
#include <utility>

#include "formats.h"
#include "kernels.h"
#include "x86_common.h"

namespace moemesh {
namespace {

// Fixed-order horizontal sum of 16 lanes: fold the halves, then the 8-lane AVX sum.
inline float hsum512(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return x86::hsum256(_mm256_add_ps(lo, hi));
}

void mxfp4_dot_f32(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks,
                   const float* const* x, int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_blocks; ++g) {
        __m128i e0, e1;
        x86::prefetch_ahead(blocks + g * Mxfp4::kBlockBytes);
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e0));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(e1));
        const __m512 sc = _mm512_set1_ps(Mxfp4::scale(scales[g]) * 0.5f);
        for (int t = 0; t < n_tok; ++t) {
            const float* xb = x[t] + g * Mxfp4::kBlock;
            const __m512 s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
            acc[t] = _mm512_fmadd_ps(s, sc, acc[t]);
        }
    }
    for (int t = 0; t < n_tok; ++t) out[t] = hsum512(acc[t]);
}

// The first n of 16 scale bytes -> 2^(s-127) * 0.5 as floats (s = 0 is the denormal 2^-128 after
// halving); lanes past n are exact zeros. They must not be denormals: an Intel core takes a
// microcode assist for every denormal operand, which made whole rows several times slower.
inline __m512 half_scales16(int n, const uint8_t* s) {
    const __mmask16 m = __mmask16((1u << n) - 1u);
    const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s));
    const __mmask16 zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), zero & m, _mm512_set1_epi32(0x00400000));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0.5f));
}

// Groups of 4 blocks decode into four int16 registers in which register j, 16-bit lane i holds
// element 4i + j of the block in its 128-bit lane. The activations (and the Q8 copy's values) are
// put in that same order once per row by group_layout, so weights never cross a lane and the four
// products of a group land in one int32 accumulator per block.
constexpr int kGroup = 4;

template <typename T>
void group_layout(T* v, int64_t n_blocks) {
    T tmp[kGroup * 32];
    for (int64_t g = 0; g + kGroup <= n_blocks; g += kGroup) {
        T* grp = v + g * 32;
        for (int j = 0; j < 4; ++j)          // register j
            for (int k = 0; k < kGroup; ++k)  // lane k = block k
                for (int i = 0; i < 8; ++i) tmp[j * 32 + k * 8 + i] = grp[k * 32 + 4 * i + j];
        std::memcpy(grp, tmp, sizeof(tmp));
    }
}

// MXFP4 rows: 64 code bytes of a group hold element 4i + j of each block as nibble j of 16-bit word
// i, so three shifts and four 16-bit table lookups decode them (vpermw reads 5 index bits of each
// word; the 16 doubled values repeated twice make that the low nibble), already signed.
struct Mxfp4Row {
    const uint8_t* blocks;
    const uint8_t* scales;
    __m512i table;

    Mxfp4Row(const uint8_t* b, const uint8_t* s) : blocks(b), scales(s) {
        alignas(64) int16_t t[32];
        for (int i = 0; i < 32; ++i) t[i] = Mxfp4::kDoubled[i & 15];
        table = _mm512_load_si512(t);
    }
    __m512 scales16(int n, int64_t g0) const { return half_scales16(n, scales + g0); }
    void group(int64_t g, __m512i w[4]) const {
        const uint8_t* codes = blocks + g * Mxfp4::kBlockBytes;
        x86::prefetch_ahead(codes);
        const __m512i b = _mm512_loadu_si512(codes);
        w[0] = _mm512_permutexvar_epi16(b, table);
        w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
        w[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 8), table);
        w[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 12), table);
    }
    __m512i one(int64_t g) const {  // a tail block, natural order
        __m128i e0, e1;
        x86::decode_block_i8(blocks + g * Mxfp4::kBlockBytes, &e0, &e1);
        return _mm512_cvtepi8_epi16(_mm256_set_m128i(e1, e0));
    }
};

// Q8 rows: the values were laid out by group_layout when the copy was made; a sign extension each.
struct Q8Row {
    const int8_t* values;
    const uint16_t* scales;

    __m512 scales16(int n, int64_t g0) const {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), scales + g0));
    }
    void group(int64_t g, __m512i w[4]) const {
        const int8_t* v = values + g * Q8::kBlock;
        x86::prefetch_ahead(v);
        x86::prefetch_ahead(v + 64);
        for (int j = 0; j < 4; ++j)
            w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * j)));
    }
    __m512i one(int64_t g) const {
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + g * Q8::kBlock)));
    }
};

// Per 4 blocks and token: one VNNI chain into an int32 accumulator, one convert, one FMA with the
// blocks' combined scales. Tail blocks (n_blocks % 4) keep natural order, one per step.
// NT is a template parameter so the accumulators of every token stay in registers.
template <int NT, typename Row>
void dot_q16_n(const Row& row, int64_t n_blocks, const Q16Row* x, float* out) {
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    const __m512i lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const int64_t grouped = n_blocks - n_blocks % kGroup;
    for (int64_t g0 = 0; g0 < n_blocks; g0 += 16) {
        const int n = int(n_blocks - g0 < 16 ? n_blocks - g0 : 16);
        const __mmask16 m = __mmask16((1u << n) - 1u);
        const __m512 ws = row.scales16(n, g0);
        __m512 csv[NT];
        for (int t = 0; t < NT; ++t) csv[t] = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(m, x[t].d + g0));
        int i = 0;
        for (; i + kGroup <= n && g0 + i + kGroup <= grouped; i += kGroup) {
            const int64_t g = g0 + i;
            __m512i w[4];
            row.group(g, w);
            const __m512i idx = _mm512_add_epi32(lane_block, _mm512_set1_epi32(i));
            for (int t = 0; t < NT; ++t) {
                const int16_t* q = x[t].q + g * 32;
                __m512i p = _mm512_madd_epi16(w[0], _mm512_loadu_si512(q));
                p = _mm512_dpwssd_epi32(p, w[1], _mm512_loadu_si512(q + 32));
                p = _mm512_dpwssd_epi32(p, w[2], _mm512_loadu_si512(q + 64));
                p = _mm512_dpwssd_epi32(p, w[3], _mm512_loadu_si512(q + 96));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, csv[t]), acc[t]);
            }
        }
        for (; i < n; ++i) {
            const int64_t g = g0 + i;
            const __m512i w = row.one(g);
            const __m512i idx = _mm512_set1_epi32(i);
            for (int t = 0; t < NT; ++t) {
                const __m512i p = _mm512_madd_epi16(w, _mm512_loadu_si512(x[t].q + g * 32));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, csv[t]), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; ++t) out[t] = hsum512(acc[t]);
}

// A runtime token count -> the instantiation for it.
template <typename Row, int... NT>
void dot_q16(const Row& row, int64_t n_blocks, const Q16Row* x, int n_tok, float* out,
             std::integer_sequence<int, NT...>) {
    using Fn = void (*)(const Row&, int64_t, const Q16Row*, float*);
    static constexpr Fn kVariants[] = {dot_q16_n<NT + 1, Row>...};
    kVariants[n_tok - 1](row, n_blocks, x, out);
}

void mxfp4_dot_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, const Q16Row* x,
                   int n_tok, float* out) {
    dot_q16(Mxfp4Row(blocks, scales), n_blocks, x, n_tok, out, std::make_integer_sequence<int, kMaxTokens>{});
}

void q8_dot_q16(const int8_t* w, const uint16_t* scales, int64_t n_blocks, const Q16Row* x, int n_tok,
                float* out) {
    dot_q16(Q8Row{w, scales}, n_blocks, x, n_tok, out, std::make_integer_sequence<int, kMaxTokens>{});
}

void bf16_dot_f32(const uint16_t* w, int64_t n, const float* const* x, int n_tok, float* out) {
    __m512 acc[kMaxTokens];
    for (int t = 0; t < kMaxTokens; ++t) acc[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        // Stream ahead: hardware prefetchers stop at 4 KiB page edges of the mapped checkpoint.
        x86::prefetch_ahead(w + i);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
        const __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
        for (int t = 0; t < n_tok; ++t) acc[t] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x[t] + i), acc[t]);
    }
    for (int t = 0; t < n_tok; ++t) {
        float s = hsum512(acc[t]);
        for (int64_t j = i; j < n; ++j) s += bf16_to_f32(w[j]) * x[t][j];
        out[t] = s;
    }
}

}  // namespace

const KernelTable kAvx512Kernels = {"avx512", mxfp4_dot_f32, mxfp4_dot_q16, group_layout<int16_t>, bf16_dot_f32,
                                    q8_dot_q16, group_layout<int8_t>};

}  // namespace moemesh
