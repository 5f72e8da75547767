"""The native kernels (the `_native` extension built from csrc/), re-exported under stable names.

Importing this fails with a clear message when the extension was not built (e.g. running from a
source tree without `pip install .`).
"""
from __future__ import annotations

try:
    from ._native import (  # noqa: F401  (re-exports)
        TILE_TOKENS,
        active_isa,
        add_experts,
        attend,
        attention_softmax,
        available_isas,
        bf16_matmul,
        get_threads,
        kernel_variant,
        matrix_tiles,
        max_abs,
        moe_experts,
        mxfp4_dequant,
        park_workers,
        q16_decode,
        q16_dequantize,
        q16_encode,
        q16_quantize,
        q16_round,
        q8_matmul,
        q8_quantize,
        quantize,
        rmsnorm,
        rope_rotate,
        router_topk,
        set_threads,
        stream_read,
        stream_triad,
        weight_layout,
    )
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(f"moemesh native kernels are not built ({e}); run `pip install .` in the repository") from e


def kernel_path() -> str:
    """The kernels this process runs, as benchmarks print it: the ISA and its build ('avx2+vnni',
    'avx512+vbmi', 'avx512+amx')."""
    variant = kernel_variant()
    return active_isa() + (f"+{variant}" if variant else "")


def wire_codec():
    """The wire's q16 arithmetic on the native kernels (expert_node.protocol.Codec): a hop's numpy
    calls run right after the kernels have flushed the caches (decoding a token's activations took
    137 us through numpy, 16 us here)."""
    from .protocol import Codec

    return Codec(q16_encode, q16_decode, max_abs)
