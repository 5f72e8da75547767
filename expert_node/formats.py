"""Quantized weight formats as a table: one QuantFormat record per format (csrc/formats.h holds
the native side's rows: block geometry, and each ISA's kernels per format).

Adding a format = one row here, its reference encode and decode functions, its native kernels;
parametrised tests iterate over QUANT_FORMATS. The numpy decode functions are the spec the kernels are tested
against. Not here: which tensors use which format (the model family decides).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# FP4 E2M1 code -> value; bit 3 is the sign (spec/gpt-oss.md §3.3).
FP4_VALUES = np.array(
    [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
UE8_BIAS = 127  # E8M0 scale byte s means 2^(s - 127)


def mxfp4_unpack_codes(blocks: np.ndarray) -> np.ndarray:
    """Packed bytes [..., G, 16] -> 4-bit codes [..., G, 32] in element order.

    The one place the nibble order is pinned: the LOW nibble of byte j is element 2j, the HIGH
    nibble element 2j+1 (the checkpoint's order; ggml's split-halves order would be wrong here).
    """
    codes = np.empty(blocks.shape[:-1] + (blocks.shape[-1] * 2,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    return codes


def mxfp4_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [..., G, 16] u8 and scales [..., G] u8 -> float32 [..., G*32], exactly."""
    values = FP4_VALUES[mxfp4_unpack_codes(blocks)]
    multipliers = np.ldexp(np.float32(1.0), scales.astype(np.int32) - UE8_BIAS).astype(np.float32)
    out = values * multipliers[..., None]
    return out.reshape(out.shape[:-2] + (out.shape[-2] * out.shape[-1],))


# Every FP4 magnitude and the midpoints between neighbours: round to nearest, ties to the even code.
FP4_MAGNITUDES = FP4_VALUES[:8]
FP4_MIDPOINTS = (FP4_MAGNITUDES[1:] + FP4_MAGNITUDES[:-1]) / 2


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] (K % 32 == 0, finite) -> MXFP4 blocks [..., K/32, 16] u8 and scales [..., K/32] u8.

    Each block's scale is the smallest power of two that brings its largest magnitude within
    FP4's 6: 2^(floor(log2 amax) - 2) (OCP MX's choice, exact from the float's exponent), once more
    where amax / 2^e is above 6 (OCP would clip those to 6). Values round to the nearest FP4 value,
    ties to the even code. An all-zero block gets the smallest scale byte, 0.
    """
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(blocks).max(axis=-1)
    e = np.frexp(amax)[1].astype(np.int32) - 3  # amax = m * 2^x, m in [0.5, 1): floor(log2 amax) = x - 1
    e = np.where(np.ldexp(amax, -e) > 6.0, e + 1, e)
    e = np.where(amax > 0, np.clip(e, -UE8_BIAS, 127), -UE8_BIAS)
    scaled = np.ldexp(np.abs(blocks), -e[..., None])  # exact: a power-of-two scaling
    idx = np.searchsorted(FP4_MIDPOINTS, scaled, side="left")  # the nearest magnitude, lower on ties ...
    at_mid = (idx < 7) & (scaled == FP4_MIDPOINTS[np.minimum(idx, 6)])
    idx = np.where(at_mid & (idx % 2 == 1), idx + 1, idx)  # ... except where the lower code is odd
    codes = idx.astype(np.uint8) | np.where(np.signbit(blocks) & (idx > 0), 8, 0).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.astype(np.uint8), (e + UE8_BIAS).astype(np.uint8)


Q16_BLOCK = 32
Q16_MAX = 32639.0  # codes split into two signed bytes (csrc/formats.h)
# Activations at the expert boundary, in the kernels and on the wire: fp32 for exact; per-32 int16
# blocks for fast (bf16 was measured too coarse: top-1 agreement with exact fell to 96% on the
# tiny models).
ACTIVATION_DTYPE = {"reference": "f32", "exact": "f32", "fast": "q16"}


def q16_quantize(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations [..., n] (n % 32 == 0) -> int16 codes [..., n] and float32 scales [..., n/32]:
    symmetric per-32 blocks, scale = block max / 32639. The `fast` precision's activation format,
    both in the expert kernels and on the wire (15 bits per value, 2.125 bytes)."""
    blocks = a.astype(np.float32).reshape(*a.shape[:-1], a.shape[-1] // Q16_BLOCK, Q16_BLOCK)
    d = (np.abs(blocks).max(axis=-1) / np.float32(Q16_MAX)).astype(np.float32)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[..., None]).astype(np.int16)
    return q.reshape(a.shape), d


def q16_dequantize(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    blocks = q.reshape(*q.shape[:-1], q.shape[-1] // Q16_BLOCK, Q16_BLOCK).astype(np.float32)
    return (blocks * d[..., None]).reshape(q.shape)


FP16_MAX = np.float32(65504.0)  # Q4 and Q8 scales saturate here (weights beyond 8 or 127 times it clip)


def fp16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits).view("<f2").astype(np.float32)


def q4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] (K % 32 == 0, finite) -> Q4 blocks [..., K/32, 16] u8 and fp16 scales [..., K/32]
    (as uint16 bits): llama.cpp's Q4_0 values in MXFP4's nibble order.

    A block's scale is its value of largest magnitude (the first on ties) over -8, rounded to fp16
    (saturated at fp16's largest), so that value lands on code 0 (-8) and the rest use the 16
    steps; codes are round-half-even of w / scale (the fp16 scale, as stored) plus 8, clipped to
    0..15.
    """
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    at = np.abs(blocks).argmax(axis=-1)
    extreme = np.take_along_axis(blocks, at[..., None], axis=-1)[..., 0]
    d16 = np.clip(extreme / np.float32(-8.0), -FP16_MAX, FP16_MAX).astype(np.float16)
    d = d16.astype(np.float32)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    codes = np.clip(np.rint(blocks * inv[..., None]) + np.float32(8.0), 0, 15).astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), d16.view(np.uint16)


def q4_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4 blocks [..., G, 16] u8 and fp16 scales [..., G] (uint16 bits) -> float32 [..., G*32], exactly."""
    values = mxfp4_unpack_codes(blocks).astype(np.float32) - np.float32(8.0)
    out = values * fp16_bits_to_f32(scales)[..., None]
    return out.reshape(out.shape[:-2] + (out.shape[-2] * out.shape[-1],))


def q8_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] (K % 32 == 0, finite) -> Q8 values [..., K/32, 32] int8 and fp16 scales [..., K/32]
    (uint16 bits), llama.cpp's Q8_0: scale = block max magnitude / 127 rounded to fp16 (saturated), values
    w / scale rounded half away from zero (the native quantizer's lround), clipped to +-127."""
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    d16 = np.minimum(np.abs(blocks).max(axis=-1) / np.float32(127.0), FP16_MAX).astype(np.float16)
    d = d16.astype(np.float32)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d > 0)
    v = (blocks * inv[..., None]).astype(np.float64)  # exact: the half-away rounding below is too
    values = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)
    return values, d16.view(np.uint16)


def q8_dequant(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8 values [..., G, 32] int8 and fp16 scales [..., G] (uint16 bits) -> float32 [..., G*32], exactly."""
    out = values.astype(np.float32) * fp16_bits_to_f32(scales)[..., None]
    return out.reshape(out.shape[:-2] + (out.shape[-2] * out.shape[-1],))


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int  # weights sharing one scale, along the reduction axis
    block_bytes: int  # packed bytes per block
    scale_bytes: int  # scale bytes per block
    dequant: Callable[[np.ndarray, np.ndarray], np.ndarray]  # numpy reference decode
    quantize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # numpy reference encode
    values_dtype: str  # safetensors dtype of the blocks tensor (numpy: checkpoint.SAFETENSORS_DTYPES)
    scales_dtype: str  # ... and of the scales tensor; F16 scales are handled as their uint16 bits

    @property
    def values_np(self) -> np.dtype:
        """The blocks' numpy dtype, in a checkpoint and in the kernels."""
        return np.dtype(np.int8) if self.values_dtype == "I8" else np.dtype(np.uint8)

    @property
    def scales_np(self) -> np.dtype:
        """The scales' numpy dtype as the kernels take them (fp16 scales as their uint16 bits)."""
        return np.dtype("<u2") if self.scale_bytes == 2 else np.dtype(np.uint8)

    def packed_shapes(self, rows: int, cols: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """Shapes of the blocks and scales tensors for a [rows, cols] weight matrix."""
        groups = cols // self.block_size
        return (rows, groups, self.block_bytes), (rows, groups)


MXFP4 = QuantFormat("mxfp4", 32, 16, 1, mxfp4_dequant, mxfp4_quantize, "U8", "U8")
Q4 = QuantFormat("q4", 32, 16, 2, q4_dequant, q4_quantize, "U8", "F16")
Q8 = QuantFormat("q8", 32, 32, 2, q8_dequant, q8_quantize, "I8", "F16")
QUANT_FORMATS: dict[str, QuantFormat] = {f.name: f for f in (MXFP4, Q4, Q8)}
