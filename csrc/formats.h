// Quantization formats as a table of traits (the ggml `type_traits` idea): block geometry and the
// reference decode live here once; ISA kernels only implement dot products over these blocks.
// Not here: anything about tensors, files or threads.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moemesh {

// MXFP4 (OCP MX v1.0): 32 FP4 E2M1 codes share one E8M0 scale byte.
struct Mxfp4 {
    static constexpr int kBlock = 32;          // weights per block, along the reduction axis
    static constexpr int kBlockBytes = 16;     // two codes per byte
    static constexpr int kScaleBytes = 1;      // one UE8M0 exponent per block
    // E2M1 code -> value. Index = 4-bit code (bit3 sign).
    static constexpr float kValues[16] = {+0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    // The same values doubled, as int8: exact integers for int8 dot products (halved by int_scale).
    static constexpr int8_t kInts[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    // The integers' offset to unsigned bytes (byte_planes.h): 0 .. 24.
    static constexpr int kIntOffset = 12;
    using Scale = uint8_t;

    // 2^(s - 127), exact for every byte, built from bits (ldexp is a slow libm call in a hot loop):
    // s = 0 is the denormal 2^-127; s = 255 gives +inf, as the references do not special-case it.
    static inline float scale(uint8_t s) {
        const uint32_t bits = s == 0 ? 0x00400000u : uint32_t(s) << 23;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    // A block's factor for its kInts: the scale, halved (kInts are doubled values).
    static inline float int_scale(uint8_t s) { return scale(s) * 0.5f; }
    // Element 2j of a block is the LOW nibble of byte j, element 2j+1 the HIGH nibble
    // (spec/gpt-oss.md §3.3; this is not ggml's split-halves order).
    static inline void decode_block(const uint8_t* codes, uint8_t scale_byte, float* out) {
        const float s = scale(scale_byte);
        for (int j = 0; j < kBlockBytes; ++j) {
            out[2 * j] = kValues[codes[j] & 0x0F] * s;
            out[2 * j + 1] = kValues[codes[j] >> 4] * s;
        }
    }
};

// bf16 is the top half of an IEEE float32: widening is a shift, exact.
static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// IEEE half <-> float, portable (scales of the Q8 dense copy). Round to nearest even on the way in.
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = std::ldexp(float(man), -24);  // zero or subnormal
    } else if (exp == 31) {
        f = man ? NAN : INFINITY;
    } else {
        const uint32_t bits = ((exp + 112) << 23) | (man << 13);
        std::memcpy(&f, &bits, 4);
    }
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000);
    const float a = std::fabs(f);
    if (!(a < 65520.f)) return uint16_t(sign | (a != a ? 0x7E00 : 0x7C00));  // overflow, inf, nan
    if (a < 6.103515625e-05f) return uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.f)));  // subnormal
    uint32_t b;
    std::memcpy(&b, &a, 4);
    const uint32_t round = ((b >> 13) & 1) + 0xFFF;  // to nearest, ties to even
    return uint16_t(sign | (((b + round) >> 13) - (112 << 10)));
}

// Q4: 4-bit integers with a finer scale than MXFP4's power of two, for models trained in bf16
// (llama.cpp's Q4_0 values): 32 codes per block packed as MXFP4's (element 2j the low nibble of
// byte j), value = (code - 8) * scale, one fp16 scale per block.
struct Q4 {
    static constexpr int kBlock = 32;
    static constexpr int kBlockBytes = 16;
    static constexpr int kScaleBytes = 2;
    static constexpr int8_t kInts[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
    static constexpr int kIntOffset = 8;  // the offset bytes are the codes themselves
    using Scale = uint16_t;
    static inline float int_scale(uint16_t s) { return f16_to_f32(s); }
};

// Q8: 32 int8 values per block along the reduction axis with one fp16 scale, w ~ scale * q,
// |q| <= 127 (llama.cpp's Q8_0 idea): experts converted to 8 bits, and the optional 8-bit copy of
// dense bf16 weights.
struct Q8 {
    static constexpr int kBlock = 32;
    static constexpr int kBlockBytes = 32;
    static constexpr int kScaleBytes = 2;
    static constexpr float kMax = 127.f;
    using Scale = uint16_t;
    static inline float int_scale(uint16_t s) { return f16_to_f32(s); }
};

// The weight formats the matmul kernels read, as rows of one table (ggml's type traits): a format
// is its row here plus its kernels in each ISA's KernelTable::formats. Every block holds 32
// weights along the reduction axis.
enum class WeightFormat { Mxfp4 = 0, Q4 = 1, Q8 = 2 };
constexpr int kWeightFormats = 3;

struct FormatInfo {
    const char* name;
    int block_bytes;  // packed weight bytes per block
    int scale_bytes;  // scale bytes per block
};
inline constexpr FormatInfo kFormatInfo[kWeightFormats] = {
    {"mxfp4", Mxfp4::kBlockBytes, Mxfp4::kScaleBytes},
    {"q4", Q4::kBlockBytes, Q4::kScaleBytes},
    {"q8", Q8::kBlockBytes, Q8::kScaleBytes},
};
inline const FormatInfo& format_info(WeightFormat f) { return kFormatInfo[int(f)]; }

// Activations of the `fast` precision: per-32 symmetric int16 (scale = block max / 32639), so
// expert dot products run as exact integer sums. int8 blocks (llama.cpp's Q8_0) were measured too
// coarse on gpt-oss's heavy-tailed SwiGLU outputs (mean KL 1.6e-2 vs exact on the tiny models).
// 32639 rather than 32767: every code then splits into two signed bytes, x = 256 * hi + lo with
// hi, lo in [-128, 127], which the AVX-512 path feeds to 8-bit dot-product instructions.
struct Q16Block {
    static constexpr int kBlock = 32;
    static constexpr float kMax = 32639.f;
};

// Round half to even without a libm call (the baseline x86 build has no rounding instruction, and
// nearbyintf per value made quantizing a prefill chunk cost 16 ms): adding and subtracting
// 1.5 * 2^23 leaves the nearest integer under the default rounding mode, exact for |v| < 2^22.
inline float round_half_even(float v) {
    constexpr float kMagic = 12582912.f;
    return (v + kMagic) - kMagic;
}

}  // namespace moemesh
