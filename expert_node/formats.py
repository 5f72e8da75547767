"""Quantized weight formats as a table: one QuantFormat record per format.

Adding a format = one row here, one reference decode function, one native kernel; parametrised
tests iterate over QUANT_FORMATS. The numpy decode functions are the spec the kernels are tested
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


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int  # weights sharing one scale, along the reduction axis
    block_bytes: int  # packed bytes per block
    scale_bytes: int  # scale bytes per block
    dequant: Callable[[np.ndarray, np.ndarray], np.ndarray]  # numpy reference decode

    def packed_shapes(self, rows: int, cols: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """Shapes of the blocks and scales tensors for a [rows, cols] weight matrix."""
        groups = cols // self.block_size
        return (rows, groups, self.block_bytes), (rows, groups)


MXFP4 = QuantFormat("mxfp4", block_size=32, block_bytes=16, scale_bytes=1, dequant=mxfp4_dequant)
QUANT_FORMATS: dict[str, QuantFormat] = {f.name: f for f in (MXFP4,)}
