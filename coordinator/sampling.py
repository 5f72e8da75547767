"""Next-token sampling: temperature, top-k, top-p, min-p, seeded; greedy at temperature 0.

Defaults follow gpt-oss (temperature 1.0, top-p 1.0). Filters apply in llama.cpp's order
(top-k, top-p, min-p) after the temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits [V] (float32)."""
    if params.temperature == 0:
        return int(np.argmax(logits))  # lowest id wins ties
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        order, p = order[:keep], p[:keep]
    if params.min_p > 0:
        keep = p >= params.min_p * p[0]
        order, p = order[keep], p[keep]
    p /= p.sum()
    return int(order[rng.choice(p.size, p=p)])
