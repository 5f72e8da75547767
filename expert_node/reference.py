"""The numpy reference of what an expert node computes: the gpt-oss expert FFN.

Short and unoptimised on purpose: it is the spec the native kernels are tested against
(spec/gpt-oss.md §2.7). Not here: routing (the coordinator's job) or any I/O.
"""
from __future__ import annotations

import numpy as np

SWIGLU_ALPHA = 1.702  # gpt-oss: not in config.json; HF default swiglu_alpha
SWIGLU_LIMIT = 7.0  # gpt-oss config.json swiglu_limit


def split_gate_up(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one place the fused gate_up layout is pinned: rows are interleaved, gate = even, up = odd."""
    return h[..., 0::2], h[..., 1::2]


def swiglu_clamped(h: np.ndarray, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> np.ndarray:
    """gpt-oss activation on interleaved gate/up pre-activations [..., 2I] -> [..., I].

    gate is clamped from above only, up on both sides, and up gets +1 (the reference's quirk).
    """
    gate, up = split_gate_up(h)
    gate = np.minimum(gate, np.float32(limit))
    up = np.clip(up, np.float32(-limit), np.float32(limit))
    with np.errstate(over="ignore"):  # exp(+large) = inf gives sigmoid 0, the right limit
        sigmoid = np.float32(1.0) / (np.float32(1.0) + np.exp(-np.float32(alpha) * gate))
    return gate * sigmoid * (up + np.float32(1.0))


def expert_ffn(
    x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
    alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
) -> np.ndarray:
    """One expert on tokens x [T, H]: down(swiglu(gate_up(x) + b1)) + b2, unweighted, float32.

    w1 [2I, H] and w2 [H, I] are dequantized float32 matrices in [out, in] orientation.
    """
    h = x @ w1.T + b1
    return swiglu_clamped(h, alpha, limit) @ w2.T + b2
