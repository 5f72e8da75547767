// AMX tiles for matmuls over many tokens (Sapphire Rapids and later): the fast path's MXFP4
// experts and Q8 dense copy, and (at the end of the file) the bf16 dense matrices in prefill. One
// tile multiply gives a block's sums for 16 weight rows x 16 tokens; VNNI needs 8 vpdpbusd per row
// and token pass of 4 for the same, and decodes MXFP4 weights again for every pass. Here a 32-row
// group's weights are decoded once for all its token groups, or just ahead of use for one or two
// (DecodedRows).
//
// The fast path's results are bit-identical to the AVX-512 VNNI kernels' (their dot_q16), so a token may take either path: the same sum per block, the same float operations
// on it, accumulated into 16 lanes per output with block b in lane b % 16 in the same order, folded
// by the same tree. Only the order of the products inside a block differs; exact sums do not care.
//
// MXFP4 and Q4 (AMX-BF16): their integers (doubled weights, codes - 8) and the codes' hi bytes times 256 and lo bytes are integers
// bf16 holds exactly, and every partial sum of a block stays below 2^24, so TDPBF16PS's fp32
// accumulation yields the block's exact sum of weights times codes, hi and lo in one C tile,
// which is what the VNNI kernel converts to float. Q8 (AMX-INT8): its sums can pass 2^24, so
// offset weight bytes against hi and lo code bytes give two int32 tiles, recombined as the VNNI
// kernel does. In both, A tile rows are a block's 32 weights in activation plane order (4-element
// group p = plane p of avx512_layout.h) and a packed group holds the B tiles: the same block of 16
// tokens, interleaved by token in 2- (bf16) or 4-element (int8) groups.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_layout.h"
#include "kernels_amx.h"

namespace moemesh {

bool amx_usable() {
    static const bool usable = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
        if (!amx_bf16 || !amx_tile || !amx_int8) return false;
        // Linux hands a process the 8 KB tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM
        // for XFEATURE_XTILEDATA), for the whole process: the pool's workers use it too.
        constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return usable;
}

namespace amx {
namespace {

constexpr int kRowsPerTile = 16;
constexpr int kRowGroup = 2 * kRowsPerTile;  // rows per step: two A tiles share the B tiles
constexpr int kCTileFloats = kRowsPerTile * kTileTokens;

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
    // Tiles 0-3: C (16 rows x 16 32-bit sums); 4-5: A (16 rows of a_bytes); 6-7: B.
    TileConfig(int a_bytes, int b_rows) {
        for (int t = 0; t < 4; ++t) colsb[t] = 64, rows[t] = kRowsPerTile;
        for (int t = 4; t < 6; ++t) colsb[t] = uint16_t(a_bytes), rows[t] = kRowsPerTile;
        for (int t = 6; t < 8; ++t) colsb[t] = 64, rows[t] = uint8_t(b_rows);
    }
};

// Block b of a row in plane layout (int16 codes split into bytes, or the Q8 copy), its 32 bytes in
// plane order: dword p from plane first_plane + p. bytes_per_element: 2 for codes, 1 for Q8.
inline __m256i plane_order(const int8_t* row, int bytes_per_element, int64_t n_blocks, int64_t b, int first_plane) {
    const int64_t g0 = b / avx512::kChunk * avx512::kChunk;
    const int n = int(std::min<int64_t>(avx512::kChunk, n_blocks - g0)), k = int(b - g0);
    const int8_t* chunk = row + g0 * 32 * bytes_per_element;
    const __m256i planes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(n));
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(chunk + avx512::plane_byte(first_plane, n, k, 0)),
                                  planes, 4);
}

// B tile rows from 16 tokens' vectors: lane j of v[t] (token t's dword for tile row j) -> row j at
// out + 64 j, token t at its byte 4 t. A 16 x 16 dword transpose and a store per row: the scatters
// it replaced (a store per dword) were most of a tile group's packing.
inline void store_token_columns(const __m512i v[16], int8_t* out) {
    __m512 r[16];
    for (int t = 0; t < 16; ++t) r[t] = _mm512_castsi512_ps(v[t]);
    avx512::transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + 64 * j, r[j]);
}

// A tiles 4-5 (two row tiles of a decoded block, rows of a_bytes) and B tiles 6-7 (a packed block).
inline void load_tiles(const uint8_t* a_block, int a_bytes, const int8_t* pb, int b_tile_bytes) {
    _tile_loadd(4, a_block, a_bytes);
    _tile_loadd(5, a_block + kRowsPerTile * a_bytes, a_bytes);
    _tile_loadd(6, pb, 64);
    _tile_loadd(7, pb + b_tile_bytes, 64);
}

// 4-bit formats (MXFP4, Q4) on AMX-BF16. C tiles 0-1 take even blocks and 2-3 odd ones, so zeroing a block's C tiles
// need not wait for the previous block's stores. (Measured: tile and vector work did not overlap
// on this Sapphire Rapids guest whatever the order; the tiles' time plus the vector epilogue's is
// what a block costs.)
template <typename Format>
struct NibblesBf16 {
    static constexpr int kABytes = 64;                         // 32 bf16 weights per tile row
    static constexpr int kABlockBytes = kABytes * kRowGroup;   // a block of a row group, decoded
    static constexpr int kBRows = 16;                          // pairs of K
    static constexpr int kBTileBytes = kBRows * 64;
    static constexpr int64_t kPackedBlockBytes = 2 * kBTileBytes + kTileTokens * 4;  // B hi*256, B lo, scales

    const uint8_t* blocks;
    const uint8_t* scales;
    int64_t n_blocks, rows_total;

    // Blocks g0 .. g0 + 3 of the row group at r0 as bf16 integers (Format::kInts): out[i * kABlockBytes +
    // r * 64] = block g0 + i of row r (rows past n_rows: 0). A zmm of codes is 4 blocks: nibbles L
    // (low) and H (high) of dword c are planes 2c and 2c + 1, interleaved to L0 H0 L1 H1 L2 H2 L3
    // H3, then widened and looked up as bf16. The next row group's codes are pulled into L2 in step
    // (a row group is one stretch of the matrix).
    void decode4(int64_t r0, int n_rows, int64_t g0, uint8_t* out) const {
        alignas(64) static const struct Table {
            uint16_t bf16[32];
            Table() : bf16{} {
                for (int i = 0; i < 32; ++i) {
                    const float v = float(Format::kInts[i & 15]);
                    uint32_t bits;
                    std::memcpy(&bits, &v, 4);
                    bf16[i] = uint16_t(bits >> 16);  // small integers: exact
                }
            }
        } kTable;
        const __m512i table = _mm512_load_si512(kTable.bf16), low = _mm512_set1_epi8(0x0F);
        const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);   // lanes 0, 1 of u0 and u1
        const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);  // lanes 2, 3
        const int n_blk = int(std::min<int64_t>(4, n_blocks - g0));
        const __mmask64 m = n_blk == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * n_blk)) - 1;
        const int64_t row_bytes = n_blocks * Format::kBlockBytes;
        const uint8_t* next = blocks + (r0 + kRowGroup) * row_bytes;
        const int64_t next_bytes = std::min<int64_t>(kRowGroup, std::max<int64_t>(0, rows_total - r0 - kRowGroup)) * row_bytes;
        for (int64_t p = g0 * next_bytes / n_blocks / 64 * 64; p < (g0 + n_blk) * next_bytes / n_blocks; p += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next) + p, _MM_HINT_T1);
        for (int r = 0; r < kRowGroup; ++r) {
            __m512i x = _mm512_setzero_si512();
            if (r < n_rows) x = _mm512_maskz_loadu_epi8(m, blocks + (r0 + r) * row_bytes + g0 * Format::kBlockBytes);
            const __m512i lo = _mm512_and_si512(x, low), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            const __m512i u0 = _mm512_unpacklo_epi32(lo, hi), u1 = _mm512_unpackhi_epi32(lo, hi);
            const __m512i b01 = _mm512_permutex2var_epi64(u0, first, u1), b23 = _mm512_permutex2var_epi64(u0, second, u1);
            const __m256i nibbles[4] = {_mm512_castsi512_si256(b01), _mm512_extracti64x4_epi64(b01, 1),
                                        _mm512_castsi512_si256(b23), _mm512_extracti64x4_epi64(b23, 1)};
            for (int i = 0; i < n_blk; ++i)
                _mm512_storeu_si512(out + i * kABlockBytes + r * kABytes,
                                    _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibbles[i]), table));
        }
    }
    __m512 scales16(int64_t r, int64_t g0, int n) const {
        if constexpr (std::is_same_v<Format, Mxfp4>) return avx512::half_scales16(n, scales + r * n_blocks + g0);
        else return avx512::f16_scales16(n, reinterpret_cast<const uint16_t*>(scales) + r * n_blocks + g0);
    }

    // C tiles of block b: both row tiles, hi*256 and lo products summed in one tile each.
    static void multiply(int64_t b, const uint8_t* a_block, const int8_t* pb) {
        if (b % 2 == 0) {
            _tile_zero(0);
            _tile_zero(1);
        } else {
            _tile_zero(2);
            _tile_zero(3);
        }
        load_tiles(a_block, kABytes, pb, kBTileBytes);
        if (b % 2 == 0) {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(0, 4, 7);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(1, 5, 7);
        } else {
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    static void store(int64_t b, float* c) {
        if (b % 2 == 0) {
            _tile_stored(0, c, 64);
            _tile_stored(1, c + kCTileFloats, 64);
        } else {
            _tile_stored(2, c, 64);
            _tile_stored(3, c + kCTileFloats, 64);
        }
    }
    // Row r's exact block sums (16 tokens) from the stored C tiles.
    static __m512 sums(const float* c, int r, const int8_t*) { return _mm512_load_ps(c + r * kTileTokens); }
    static const float* code_scales(const int8_t* pb) { return reinterpret_cast<const float*>(pb + 2 * kBTileBytes); }

    // B row j holds plane-order elements 2j and 2j + 1 of each token: [hi * 256 tile | lo tile | scales].
    // Tokens past n_tok: zeros.
    static void pack(const Q16Row* x, int n_tok, int64_t nb, int8_t* packed) {
        auto bf16_pairs = [](__m256i bytes, float scale) {
            auto half = [&](__m128i b) {
                const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(scale));
                return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16));  // exact: small integers
            };
            return _mm512_inserti64x4(_mm512_castsi256_si512(half(_mm256_castsi256_si128(bytes))),
                                      half(_mm256_extracti128_si256(bytes, 1)), 1);
        };
        for (int64_t b = 0; b < nb; ++b) {
            int8_t* pb = packed + b * kPackedBlockBytes;
            float* d = reinterpret_cast<float*>(pb + 2 * kBTileBytes);
            __m512i hi[kTileTokens], lo[kTileTokens];
            for (int t = 0; t < kTileTokens; ++t) {
                hi[t] = lo[t] = _mm512_setzero_si512();
                d[t] = 0.f;
                if (t >= n_tok) continue;
                const int8_t* codes = reinterpret_cast<const int8_t*>(x[t].q);
                hi[t] = bf16_pairs(plane_order(codes, 2, nb, b, 0), 256.f);
                lo[t] = bf16_pairs(plane_order(codes, 2, nb, b, 8), 1.f);
                d[t] = x[t].d[b];
            }
            store_token_columns(hi, pb);
            store_token_columns(lo, pb + kBTileBytes);
        }
    }
};

// Q8 on AMX-INT8: offset bytes against hi and lo code bytes, two int32 C tiles per row tile.
struct Q8Int8 {
    static constexpr int kABytes = 32;                         // 32 offset weight bytes per tile row
    static constexpr int kABlockBytes = kABytes * kRowGroup;
    static constexpr int kBRows = 8;                           // 4-byte groups of K
    static constexpr int kBTileBytes = kBRows * 64;
    static constexpr int64_t kPackedBlockBytes = 2 * kBTileBytes + 2 * kTileTokens * 4;  // B hi, B lo, scales, sums
    static constexpr float kOffset = 128.f;

    const int8_t* values;
    const uint16_t* scales;
    int64_t n_blocks, rows_total;

    // Blocks g0 .. g0 + 3, laid out as NibblesBf16::decode4's. The copy is already offset bytes in
    // plane layout: a block's 8 dwords come from its chunk's planes.
    void decode4(int64_t r0, int n_rows, int64_t g0, uint8_t* out) const {
        const int64_t row_bytes = n_blocks * Q8::kBlock;
        for (int r = 0; r < kRowGroup; ++r)
            for (int64_t b = g0; b < std::min<int64_t>(g0 + 4, n_blocks); ++b) {
                const __m256i v = r < n_rows ? plane_order(values + (r0 + r) * row_bytes, 1, n_blocks, b, 0)
                                             : _mm256_setzero_si256();
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (b - g0) * kABlockBytes + r * kABytes), v);
            }
    }
    __m512 scales16(int64_t r, int64_t g0, int n) const {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1u), scales + r * n_blocks + g0));
    }

    // C tiles: 0 hi / 1 lo of row tile 0, 2 / 3 of row tile 1.
    static void multiply(int64_t, const uint8_t* a_block, const int8_t* pb) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        load_tiles(a_block, kABytes, pb, kBTileBytes);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    static void store(int64_t, float* c) {
        _tile_stored(0, c, 64);
        _tile_stored(1, c + kCTileFloats, 64);
        _tile_stored(2, c + 2 * kCTileFloats, 64);
        _tile_stored(3, c + 3 * kCTileFloats, 64);
    }
    // float(256 * hi + lo) - offset * (sum of codes), as q8_dot_q16's block_sums.
    static __m512 sums(const float* c, int r, const int8_t* pb) {
        const int32_t* hi = reinterpret_cast<const int32_t*>(c) + (r / kRowsPerTile) * 2 * kCTileFloats +
                            (r % kRowsPerTile) * kTileTokens;
        const __m512i p = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi), 8), _mm512_load_si512(hi + kCTileFloats));
        const __m512 code_sums = _mm512_loadu_ps(code_scales(pb) + kTileTokens);
        return _mm512_fnmadd_ps(_mm512_set1_ps(kOffset), code_sums, _mm512_cvtepi32_ps(p));
    }
    static const float* code_scales(const int8_t* pb) { return reinterpret_cast<const float*>(pb + 2 * kBTileBytes); }

    // B row j holds plane j's 4 bytes of each token: [hi tile | lo tile | scales | code sums]; the
    // lo tile's rows follow the hi tile's, so a token's hi and lo dwords transpose as one vector.
    // Tokens past n_tok: zeros.
    static void pack(const Q16Row* x, int n_tok, int64_t nb, int8_t* packed) {
        static_assert(kBTileBytes == 8 * 64, "the lo tile starts at row 8");
        for (int64_t b = 0; b < nb; ++b) {
            int8_t* pb = packed + b * kPackedBlockBytes;
            float* d = reinterpret_cast<float*>(pb + 2 * kBTileBytes);
            __m512i hi_lo[kTileTokens];
            for (int t = 0; t < kTileTokens; ++t) {
                hi_lo[t] = _mm512_setzero_si512();
                d[t] = d[kTileTokens + t] = 0.f;
                if (t >= n_tok) continue;
                const int8_t* codes = reinterpret_cast<const int8_t*>(x[t].q);
                hi_lo[t] = _mm512_inserti64x4(_mm512_castsi256_si512(plane_order(codes, 2, nb, b, 0)),
                                              plane_order(codes, 2, nb, b, 8), 1);
                d[t] = x[t].d[b];
                d[kTileTokens + t] = float(x[t].s[b]);
            }
            store_token_columns(hi_lo, pb);
        }
    }
};

// Where token_group finds a block's decoded rows: the whole row group decoded up front, which
// three or more token groups share, or, for one or two, 4 blocks at a time just ahead of use into
// a ring that stays in L1 (decoding twice costs less than a round trip of the bf16 rows through
// L2: 256 rows x 16 tokens 153 -> 90 us, x 32 tokens 192 -> 178 us).
template <typename Format>
struct DecodedRows {
    static constexpr int kRingBlocks = 8;
    const Format& rows;
    int64_t r0;
    int n_rows;
    uint8_t* base;
    bool streaming;

    void decode_all() const {
        for (int64_t g0 = 0; g0 < rows.n_blocks; g0 += 4) rows.decode4(r0, n_rows, g0, base + g0 * Format::kABlockBytes);
    }
    // Called once per block, in order.
    const uint8_t* block(int64_t b) const {
        if (!streaming) return base + b * Format::kABlockBytes;
        uint8_t* slot = base + (b % kRingBlocks) / 4 * 4 * Format::kABlockBytes;
        if (b % 4 == 0) rows.decode4(r0, n_rows, b, slot);
        return slot + (b % 4) * Format::kABlockBytes;
    }
};

// One token group against a row group (scales[r * n_blocks + b]): out[r * 16 + t].
// acc[lane][row] (16 tokens each) = sums * (weight scale * code scale) + acc, per block, as the
// VNNI kernels do per lane.
template <typename Format>
void token_group(const DecodedRows<Format>& a, const float* scales, int64_t n_blocks, int n_rows,
                 const int8_t* packed, float* out) {
    alignas(64) float c[2][4 * kCTileFloats];  // two blocks in flight: C tiles of block b land in c[b % 2]
    // A lane's first block adds to a zero of its own (the same bits as adding to a zeroed array,
    // without 32 KB of stores per call); lanes no block reaches start at zero.
    __m512 acc[avx512::kChunk][kRowGroup];
    for (int64_t k = std::min<int64_t>(n_blocks, avx512::kChunk); k < avx512::kChunk; ++k)
        for (int r = 0; r < n_rows; ++r) acc[k][r] = _mm512_setzero_ps();
    auto accumulate = [&](int64_t b) {
        const int8_t* pb = packed + b * Format::kPackedBlockBytes;
        const __m512 code_scales = _mm512_loadu_ps(Format::code_scales(pb));
        __m512* acc_lane = acc[b % avx512::kChunk];
        const bool first = b < avx512::kChunk;
        for (int r = 0; r < n_rows; ++r) {
            const __m512 csv = _mm512_mul_ps(_mm512_set1_ps(scales[r * n_blocks + b]), code_scales);
            acc_lane[r] = _mm512_fmadd_ps(Format::sums(c[b % 2], r, pb), csv, first ? _mm512_setzero_ps() : acc_lane[r]);
        }
    };
    // Block b's tiles are issued before the vector work of block b - 1, whose C tiles are stored by then.
    for (int64_t b = 0; b < n_blocks; ++b) {
        Format::multiply(b, a.block(b), packed + b * Format::kPackedBlockBytes);
        if (b > 0) accumulate(b - 1);
        Format::store(b, c[b % 2]);
    }
    accumulate(n_blocks - 1);
    // The VNNI kernels' short last chunk adds 0 * 0 to the lanes it has no block for (-0 -> +0).
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
template <typename Format>
void tile_matmul(const Format& rows, const int8_t* packed, int64_t n_groups, float* out) {
    static const TileConfig kConfig(Format::kABytes, Format::kBRows);
    const int64_t nb = rows.n_blocks, n_rows = rows.rows_total;
    const bool streaming = n_groups <= 2;
    thread_local std::vector<uint8_t> a;
    thread_local std::vector<float> row_scales;
    const int64_t a_blocks = streaming ? DecodedRows<Format>::kRingBlocks : (nb + 3) / 4 * 4;
    uint8_t* a_tiles = cache_aligned(a, size_t(a_blocks * Format::kABlockBytes));
    scratch(row_scales, size_t(nb * kRowGroup));
    _tile_loadconfig(&kConfig);
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowGroup) {
        const int n = int(std::min<int64_t>(kRowGroup, n_rows - r0));
        const DecodedRows<Format> decoded{rows, r0, n, a_tiles, streaming};
        if (!streaming) decoded.decode_all();
        for (int r = 0; r < n; ++r)
            for (int64_t g0 = 0; g0 < nb; g0 += avx512::kChunk) {
                const int blocks = int(std::min<int64_t>(avx512::kChunk, nb - g0));
                _mm512_mask_storeu_ps(row_scales.data() + r * nb + g0, __mmask16((1u << blocks) - 1u),
                                      rows.scales16(r0 + r, g0, blocks));
            }
        for (int64_t g = 0; g < n_groups; ++g)
            token_group<Format>(decoded, row_scales.data(), nb, n, packed + g * nb * Format::kPackedBlockBytes,
                                out + (g * n_rows + r0) * kTileTokens);
    }
    _tile_release();  // the 8 KB tile state need not be saved at every context switch
}

template <typename Format>
int64_t packed_bytes(int64_t n_blocks) { return n_blocks * Format::kPackedBlockBytes; }

}  // namespace

// Q4 packs activations as MXFP4 does: both multiply bf16 integers.
int64_t tile_group_bytes(WeightFormat format, int64_t n_blocks) {
    return format == WeightFormat::Q8 ? packed_bytes<Q8Int8>(n_blocks) : packed_bytes<NibblesBf16<Mxfp4>>(n_blocks);
}

void tile_pack(WeightFormat format, const Q16Row* x, int n_tok, int64_t n_blocks, int8_t* packed) {
    if (format == WeightFormat::Q8) Q8Int8::pack(x, n_tok, n_blocks, packed);
    else NibblesBf16<Mxfp4>::pack(x, n_tok, n_blocks, packed);
}

void mxfp4_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                    const int8_t* packed, int64_t n_groups, float* out) {
    tile_matmul(NibblesBf16<Mxfp4>{blocks, scales, n_blocks, n_rows}, packed, n_groups, out);
}

void q4_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                 const int8_t* packed, int64_t n_groups, float* out) {
    tile_matmul(NibblesBf16<Q4>{blocks, scales, n_blocks, n_rows}, packed, n_groups, out);
}

void q8_tile_q16(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                 const int8_t* packed, int64_t n_groups, float* out) {
    tile_matmul(Q8Int8{reinterpret_cast<const int8_t*>(values), reinterpret_cast<const uint16_t*>(scales), n_blocks,
                       n_rows},
                packed, n_groups, out);
}

// The bf16 dense matmul on AMX-BF16. fp32 activations are exactly the sum of three bf16 parts
// (8 significand bits each: x1 = x truncated, x2 = (x - x1) truncated, x3 = the rest), so three
// tile multiplies per 32 weights give the fp32 products, accumulated in fp32 by the matrix unit
// over the whole row: C tiles 0-3 = 64 rows x 16 tokens, A 4 = 16 weight rows x 32 bf16 read in
// place from the matrix, B 5-7 = the three parts of 16 tokens' 32 activations.
namespace {
static_assert(kBf16TileRows == 4 * kRowsPerTile, "four C tiles of rows per step");
constexpr int kDenseTileBytes = 16 * 64;                  // every tile: 16 rows x 64 bytes
constexpr int64_t kDenseStepBytes = 3 * kDenseTileBytes;  // one step of 32 K: three B tiles
}  // namespace

int64_t bf16_tile_bytes(int64_t K) { return K / 32 * kDenseStepBytes; }

void bf16_tile_pack(const float* const* x, int n_tok, int64_t K, int8_t* packed) {
    const __m512i high_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                                31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i top = _mm512_set1_epi32(int(0xFFFF0000u));
    for (int64_t s = 0; s < K / 32; ++s) {
        __m512i words[3][kTileTokens];  // by part, then token; tokens past n_tok: zeros
        for (int t = 0; t < kTileTokens; ++t) {
            if (t >= n_tok) {
                for (auto& part : words) part[t] = _mm512_setzero_si512();
                continue;
            }
            __m512 rest[2] = {_mm512_loadu_ps(x[t] + 32 * s), _mm512_loadu_ps(x[t] + 32 * s + 16)};
            for (int part = 0; part < 3; ++part) {
                __m512 bf[2];
                for (int h = 0; h < 2; ++h) {
                    bf[h] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(rest[h]), top));
                    rest[h] = _mm512_sub_ps(rest[h], bf[h]);  // exact: the low bits of the same float
                }
                // The high halves of 32 floats are their bf16 values, element pairs in dword order.
                words[part][t] = _mm512_permutex2var_epi16(_mm512_castps_si512(bf[0]), high_words,
                                                           _mm512_castps_si512(bf[1]));
            }
        }
        for (int part = 0; part < 3; ++part)
            store_token_columns(words[part], packed + s * kDenseStepBytes + part * kDenseTileBytes);
    }
}

void bf16_tile_f32(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out) {
    static const TileConfig kConfig(64, 16);  // every tile 16 rows x 64 bytes
    _tile_loadconfig(&kConfig);
    const int64_t stride = K * 2, steps = K / 32;
    alignas(64) float c[4][kCTileFloats];
    for (int64_t g = 0; g < n_groups; ++g) {
        const int8_t* pg = packed + g * bf16_tile_bytes(K);
        for (int64_t r0 = 0; r0 < n_rows; r0 += kBf16TileRows) {
            const uint16_t* rows = w + r0 * K;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t s = 0; s < steps; ++s) {
                const int8_t* ps = pg + s * kDenseStepBytes;
                _tile_loadd(5, ps, 64);
                _tile_loadd(6, ps + kDenseTileBytes, 64);
                _tile_loadd(7, ps + 2 * kDenseTileBytes, 64);
#define MOEMESH_DENSE_ROW_TILE(C)                                                      \
    _tile_loadd(4, rows + (C) * kRowsPerTile * K + 32 * s, stride);                      \
    _tile_dpbf16ps(C, 4, 5);                                                             \
    _tile_dpbf16ps(C, 4, 6);                                                             \
    _tile_dpbf16ps(C, 4, 7);
                MOEMESH_DENSE_ROW_TILE(0)
                MOEMESH_DENSE_ROW_TILE(1)
                MOEMESH_DENSE_ROW_TILE(2)
                MOEMESH_DENSE_ROW_TILE(3)
#undef MOEMESH_DENSE_ROW_TILE
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            std::memcpy(out + (g * n_rows + r0) * kTileTokens, c, sizeof c);
        }
    }
    _tile_release();
}

}  // namespace amx
}  // namespace moemesh
