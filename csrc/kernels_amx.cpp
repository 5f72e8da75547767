// AMX tiles for the fast path's matmuls over many tokens (Sapphire Rapids and later): MXFP4
// experts and the Q8 dense copy. One tile multiply gives a block's int32 sums for 16 weight rows x
// 16 tokens; VNNI needs 8 vpdpbusd per row and token pass of 4 for the same, and decodes MXFP4
// weights again for every pass.
//
// The results are bit-identical to the AVX-512 VNNI kernels (mxfp4_dot_q16, q8_dot_q16), so a
// token may take either path: the same int32 sum per block (offset weight bytes against hi and lo
// code bytes, recombined as 256 * hi + lo), the same float operations on it, accumulated into 16
// lanes per output with block b in lane b % 16 in the same order, folded by the same tree. Only
// the order of the integer products inside a block differs, and integer sums do not care.
//
// Tiles: A = 16 weight rows x one block's 32 offset bytes, in activation plane order (dword p =
// plane p of avx512_layout.h); B = the block's codes of 16 tokens, 4-byte groups interleaved by
// token (the packed group); C = int32 sums, 16 rows x 16 tokens. Two row tiles, hi and lo codes:
// C tiles 0-3, A 4-5, B 6-7. Weights are decoded once per group of 32 rows for all token groups.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx512_layout.h"
#include "kernels_amx.h"

namespace moemesh {

bool amx_usable() {
    static const bool usable = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        const bool amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
        if (!amx_tile || !amx_int8) return false;
        // Linux hands a process the 8 KB tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM
        // for XFEATURE_XTILEDATA); threads started later inherit it.
        constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return usable;
}

namespace amx {
namespace {

constexpr int kRowsPerTile = 16;
constexpr int kRowGroup = 2 * kRowsPerTile;          // rows per step: two A tiles share the B tiles
constexpr int kABlockBytes = 32 * kRowGroup;         // one block of a row group's rows, decoded
constexpr int kPlaneTileBytes = 8 * 64;              // B tile: 8 rows of 4-byte groups x 16 tokens
// A packed block: B tiles for the hi and lo codes, then the 16 tokens' scales and code sums.
constexpr int64_t kPackedBlockBytes = 2 * kPlaneTileBytes + 2 * kTileTokens * 4;

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
    TileConfig() {
        for (int t = 0; t < 4; ++t) colsb[t] = 64, rows[t] = kRowsPerTile;     // C: 16 rows x 16 int32
        for (int t = 4; t < 6; ++t) colsb[t] = 32, rows[t] = kRowsPerTile;     // A: 16 rows x 32 bytes
        for (int t = 6; t < 8; ++t) colsb[t] = 64, rows[t] = 8;                // B: 8 rows x 64 bytes
    }
};

// A row group's decoded offset bytes are block-major so that each A tile is 512 contiguous bytes:
// a[b * kABlockBytes + r * 32 ..] = block b of row r (rows past n_rows: zeros). A weight format
// says how to decode them and its scales (as the VNNI kernel has them) into scales[r * n_blocks + b].

// MXFP4: a zmm of codes is 4 blocks; nibble lookups give each block's low-nibble dwords L0-L3
// (elements 8c + 0, 2, 4, 6: plane 2c) and high ones H0-H3 (plane 2c + 1), interleaved to
// L0 H0 L1 H1 L2 H2 L3 H3. The next row group's codes are pulled into L2 meanwhile (32 rows are
// one contiguous stretch of the matrix).
struct Mxfp4Rows {
    static constexpr int kOffset = avx512::Mxfp4OffsetBytes::kOffset;
    static constexpr int kDecodeBlocks = 4;
    const uint8_t* blocks;
    const uint8_t* scales;
    int64_t n_blocks, rows_total;

    void decode(int64_t r0, int n_rows, uint8_t* a) const {
        const __m512i table = _mm512_load_si512(avx512::kMxfp4OffsetBytes.values);
        // [lane 0 of u0, lane 0 of u1, lane 1 of u0, lane 1 of u1] and the same for lanes 2 and 3.
        const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
        const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
        const int64_t row_bytes = n_blocks * Mxfp4::kBlockBytes;
        const uint8_t* next = blocks + (r0 + kRowGroup) * row_bytes;
        const int64_t next_bytes = std::min<int64_t>(kRowGroup, std::max<int64_t>(0, rows_total - r0 - kRowGroup)) * row_bytes;
        int64_t prefetched = 0;
        for (int r = 0; r < kRowGroup; ++r) {
            for (; prefetched < (r + 1) * next_bytes / kRowGroup; prefetched += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next) + prefetched, _MM_HINT_T1);
            for (int64_t g0 = 0; g0 < n_blocks; g0 += kDecodeBlocks) {
                const int n_blk = int(std::min<int64_t>(kDecodeBlocks, n_blocks - g0));
                const __mmask64 m = n_blk == kDecodeBlocks ? ~__mmask64(0) : (__mmask64(1) << (16 * n_blk)) - 1;
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                if (r < n_rows) {
                    const __m512i x = _mm512_maskz_loadu_epi8(m, blocks + (r0 + r) * row_bytes + g0 * Mxfp4::kBlockBytes);
                    // vpermb reads 6 index bits: the table repeats every 16 entries, so no masking.
                    lo = _mm512_permutexvar_epi8(x, table);
                    hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(x, 4), table);
                }
                const __m512i u0 = _mm512_unpacklo_epi32(lo, hi), u1 = _mm512_unpackhi_epi32(lo, hi);
                const __m512i b01 = _mm512_permutex2var_epi64(u0, first, u1), b23 = _mm512_permutex2var_epi64(u0, second, u1);
                const __m256i pieces[kDecodeBlocks] = {_mm512_castsi512_si256(b01), _mm512_extracti64x4_epi64(b01, 1),
                                                       _mm512_castsi512_si256(b23), _mm512_extracti64x4_epi64(b23, 1)};
                for (int i = 0; i < n_blk; ++i)
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + (g0 + i) * kABlockBytes + r * 32), pieces[i]);
            }
        }
    }
    __m512 scales16(int64_t r, int64_t g0, int n) const { return avx512::half_scales16(n, scales + r * n_blocks + g0); }
};

// Q8: the copy is already offset bytes in plane layout; a block's 8 dwords are gathered from its
// chunk's 8 planes.
struct Q8Rows {
    static constexpr int kOffset = 128;
    const int8_t* values;
    const uint16_t* scales;
    int64_t n_blocks;

    void decode(int64_t r0, int n_rows, uint8_t* a) const {
        const int64_t row_bytes = n_blocks * Q8::kBlock;
        for (int r = 0; r < kRowGroup; ++r)
            for (int64_t g0 = 0; g0 < n_blocks; g0 += avx512::kChunk) {
                const int n = int(std::min<int64_t>(avx512::kChunk, n_blocks - g0));
                const int8_t* chunk = values + (r0 + r) * row_bytes + g0 * Q8::kBlock;
                const __m256i planes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(n));
                for (int k = 0; k < n; ++k) {
                    const __m256i v = r < n_rows ? _mm256_i32gather_epi32(reinterpret_cast<const int*>(chunk) + k, planes, 4)
                                                 : _mm256_setzero_si256();
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + (g0 + k) * kABlockBytes + r * 32), v);
                }
            }
    }
    __m512 scales16(int64_t r, int64_t g0, int n) const {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), scales + r * n_blocks + g0));
    }
};

// acc[lane][row] (16 tokens each) += this block's products, as the VNNI kernel does per lane:
// sums = float(256 * hi + lo) - offset * (sum of codes), acc = sums * (weight scale * code scale) + acc.
void accumulate_block(const int32_t* c, const int8_t* packed_block, float weight_offset, const float* row_scales,
                      int64_t n_blocks, int n_rows, __m512* acc_lane) {
    const __m512 offset = _mm512_set1_ps(weight_offset);
    const float* d = reinterpret_cast<const float*>(packed_block + 2 * kPlaneTileBytes);
    const __m512 code_scales = _mm512_loadu_ps(d), code_sums = _mm512_loadu_ps(d + kTileTokens);
    for (int r = 0; r < n_rows; ++r) {
        const int32_t* hi = c + (r / kRowsPerTile) * 2 * 256 + (r % kRowsPerTile) * kTileTokens;
        const __m512i p = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi), 8), _mm512_load_si512(hi + 256));
        const __m512 sums = _mm512_fnmadd_ps(offset, code_sums, _mm512_cvtepi32_ps(p));
        const __m512 csv = _mm512_mul_ps(_mm512_set1_ps(row_scales[r * n_blocks]), code_scales);
        acc_lane[r] = _mm512_fmadd_ps(sums, csv, acc_lane[r]);
    }
}

// One token group against a decoded row group (a, scales[row][block]): out[r * 16 + t].
void token_group(const uint8_t* a, float weight_offset, const float* scales, int64_t n_blocks, int n_rows,
                 const int8_t* packed, float* out) {
    alignas(64) int32_t c[2][4 * 256];  // two blocks in flight: C tiles of block b land in c[b % 2]
    __m512 acc[avx512::kChunk][kRowGroup];
    for (auto& lane : acc)
        for (auto& v : lane) v = _mm512_setzero_ps();
    // The vector work of block b - 1 runs while the matrix unit multiplies the tiles of block b.
    auto finish = [&](int64_t b) {
        accumulate_block(c[b % 2], packed + b * kPackedBlockBytes, weight_offset, scales + b, n_blocks, n_rows,
                         acc[b % avx512::kChunk]);
    };
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int8_t* pb = packed + b * kPackedBlockBytes;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        _tile_loadd(4, a + b * kABlockBytes, 32);
        _tile_loadd(5, a + b * kABlockBytes + kRowsPerTile * 32, 32);
        _tile_loadd(6, pb, 64);
        _tile_loadd(7, pb + kPlaneTileBytes, 64);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
        if (b > 0) finish(b - 1);
        int32_t* cb = c[b % 2];
        _tile_stored(0, cb, 64);
        _tile_stored(1, cb + 256, 64);
        _tile_stored(2, cb + 512, 64);
        _tile_stored(3, cb + 768, 64);
    }
    finish(n_blocks - 1);
    // The VNNI kernel's short last chunk adds 0 * 0 to the lanes it has no block for (-0 -> +0).
    if (n_blocks % avx512::kChunk)
        for (int k = int(n_blocks % avx512::kChunk); k < avx512::kChunk; ++k)
            for (int r = 0; r < n_rows; ++r) acc[k][r] = _mm512_add_ps(acc[k][r], _mm512_setzero_ps());
    // hsum512's tree over the lanes: k + 8, then + 4, + 2, + 1.
    for (int r = 0; r < n_rows; ++r) {
        __m512 v[8];
        for (int k = 0; k < 8; ++k) v[k] = _mm512_add_ps(acc[k][r], acc[k + 8][r]);
        for (int k = 0; k < 4; ++k) v[k] = _mm512_add_ps(v[k], v[k + 4]);
        for (int k = 0; k < 2; ++k) v[k] = _mm512_add_ps(v[k], v[k + 2]);
        _mm512_storeu_ps(out + r * kTileTokens, _mm512_add_ps(v[0], v[1]));
    }
}

// out[(g * n_rows + r) * 16 + t] for every row and token group.
template <typename Rows>
void tile_matmul(const Rows& rows, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    static const TileConfig kConfig;
    const int64_t nb = rows.n_blocks;
    thread_local std::vector<uint8_t> a;
    thread_local std::vector<float> row_scales;
    a.resize(size_t(nb * kABlockBytes + 63));  // tile rows must not straddle cache lines
    uint8_t* a_tiles = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(a.data()) + 63) & ~uintptr_t(63));
    row_scales.resize(size_t(nb * kRowGroup));
    _tile_loadconfig(&kConfig);
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowGroup) {
        const int n = int(std::min<int64_t>(kRowGroup, n_rows - r0));
        rows.decode(r0, n, a_tiles);
        for (int r = 0; r < n; ++r)
            for (int64_t g0 = 0; g0 < nb; g0 += avx512::kChunk) {
                const int blocks = int(std::min<int64_t>(avx512::kChunk, nb - g0));
                _mm512_mask_storeu_ps(row_scales.data() + r * nb + g0, __mmask16((1u << blocks) - 1u),
                                      rows.scales16(r0 + r, g0, blocks));
            }
        for (int64_t g = 0; g < n_groups; ++g)
            token_group(a_tiles, float(Rows::kOffset), row_scales.data(), nb, n, packed + g * q16_tile_bytes(nb),
                        out + (g * n_rows + r0) * kTileTokens);
    }
    _tile_release();  // the 8 KB tile state need not be saved at every context switch
}

}  // namespace

int64_t q16_tile_bytes(int64_t n_blocks) { return n_blocks * kPackedBlockBytes; }

void q16_tile_pack(const Q16Row* x, int n_tok, int64_t n_blocks, int8_t* packed) {
    std::memset(packed, 0, size_t(q16_tile_bytes(n_blocks)));
    for (int t = 0; t < n_tok; ++t) {
        const int8_t* codes = reinterpret_cast<const int8_t*>(x[t].q);
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t g0 = b / avx512::kChunk * avx512::kChunk;
            const int n = int(std::min<int64_t>(avx512::kChunk, n_blocks - g0)), k = int(b - g0);
            const int8_t* chunk = codes + g0 * 32 * 2;
            int8_t* pb = packed + b * kPackedBlockBytes;
            for (int j = 0; j < 8; ++j) {
                std::memcpy(pb + j * 64 + 4 * t, chunk + avx512::plane_byte(j, n, k, 0), 4);
                std::memcpy(pb + kPlaneTileBytes + j * 64 + 4 * t, chunk + avx512::plane_byte(8 + j, n, k, 0), 4);
            }
            float* d = reinterpret_cast<float*>(pb + 2 * kPlaneTileBytes);
            d[t] = x[t].d[b];
            d[kTileTokens + t] = x[t].s[b];
        }
    }
}

void mxfp4_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                    const int8_t* packed, int64_t n_groups, float* out) {
    tile_matmul(Mxfp4Rows{blocks, scales, n_blocks, n_rows}, n_rows, packed, n_groups, out);
}

void q8_tile_q16(const int8_t* values, const uint16_t* scales, int64_t n_blocks, int64_t n_rows,
                 const int8_t* packed, int64_t n_groups, float* out) {
    tile_matmul(Q8Rows{values, scales, n_blocks}, n_rows, packed, n_groups, out);
}

}  // namespace amx
}  // namespace moemesh
