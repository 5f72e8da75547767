"""The numpy reference of what an expert node computes: one expert's gated FFN.

Short and unoptimised on purpose: it is the spec the native kernels are tested against
(spec/gpt-oss.md §2.7). Every expert format hands it the same float weights (gate, up and down
projections with their biases), so one function serves them all; the activation is the model's:
gpt-oss's clamped SwiGLU or the plain one (Qwen3-MoE, Llama). Not here: routing (the
coordinator's job) or any I/O.
"""
from __future__ import annotations

import numpy as np

SWIGLU_ALPHA = 1.702  # gpt-oss: not in config.json; HF default swiglu_alpha
SWIGLU_LIMIT = 7.0  # gpt-oss config.json swiglu_limit


def split_gate_up(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one place gpt-oss's fused gate_up layout is pinned: rows are interleaved, gate = even, up = odd."""
    return h[..., 0::2], h[..., 1::2]


def swiglu_clamped(gate: np.ndarray, up: np.ndarray, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> np.ndarray:
    """gpt-oss's activation: gate is clamped from above only, up on both sides, and up gets +1
    (the reference's quirk)."""
    gate = np.minimum(gate, np.float32(limit))
    up = np.clip(up, np.float32(-limit), np.float32(limit))
    with np.errstate(over="ignore"):  # exp(+large) = inf gives sigmoid 0, the right limit
        sigmoid = np.float32(1.0) / (np.float32(1.0) + np.exp(-np.float32(alpha) * gate))
    return gate * sigmoid * (up + np.float32(1.0))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The plain SwiGLU: silu(gate) * up."""
    with np.errstate(over="ignore"):
        sigmoid = np.float32(1.0) / (np.float32(1.0) + np.exp(-gate))
    return (gate * sigmoid * up).astype(np.float32)


ACTIVATIONS = ("swiglu_clamped", "swiglu")


def expert_ffn(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, b_gate: np.ndarray, b_up: np.ndarray,
               w_down: np.ndarray, b_down: np.ndarray, shape) -> np.ndarray:
    """One expert on tokens x [T, H]: down(act(gate(x), up(x))) + b_down, unweighted, float32.

    Weights are float32 in [out, in] orientation (gate and up [I, H], down [H, I]); shape (an
    ExpertShape) names the activation and gpt-oss's SwiGLU constants.
    """
    gate, up = x @ w_gate.T + b_gate, x @ w_up.T + b_up
    if shape.activation == "swiglu_clamped":
        h = swiglu_clamped(gate, up, shape.swiglu_alpha, shape.swiglu_limit)
    elif shape.activation == "swiglu":
        h = swiglu(gate, up)
    else:
        raise ValueError(f"unknown expert activation {shape.activation!r} (known: {', '.join(ACTIVATIONS)})")
    return h @ w_down.T + b_down
