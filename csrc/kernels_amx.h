// The AMX tile functions of the AVX-512 path's KernelTable (kernels_amx.cpp; see kernels.h for
// what each computes). Declared apart so the VBMI build of kernels_avx512.cpp can put them in its
// table without being compiled for AMX itself.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace moemesh {
namespace amx {

int64_t tile_group_bytes(WeightFormat format, int64_t n_blocks);
void tile_pack(WeightFormat format, const Q16Row* x, int n_tok, int64_t n_blocks, int8_t* packed);
void mxfp4_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                    const int8_t* packed, int64_t n_groups, float* out);
void q4_tile_q16(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                 const int8_t* packed, int64_t n_groups, float* out);
void q8_tile_q16(const uint8_t* values, const uint8_t* scales, int64_t n_blocks, int64_t n_rows,
                 const int8_t* packed, int64_t n_groups, float* out);

int64_t bf16_tile_bytes(int64_t K);
void bf16_tile_pack(const float* const* x, int n_tok, int64_t K, int8_t* packed);
void bf16_tile_f32(const uint16_t* w, int64_t K, int64_t n_rows, const int8_t* packed, int64_t n_groups, float* out);

}  // namespace amx
}  // namespace moemesh
