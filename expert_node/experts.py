"""Where a layer's experts live in a checkpoint, and the ExpertBackend seam.

An ExpertBackend computes, for one layer, every selected expert of every token, unweighted:
out[t, slot] = expert_{ids[t, slot]}(x[t]). The in-process backends (numpy reference, native
kernels) and the remote one (gRPC) all sit behind it, so single-device and cluster runs share the
coordinator's code and give the same numbers. Weighting and summing the slots is the
coordinator's job, in a fixed order (see coordinator.models.gpt_oss.combine_experts).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from . import reference
from .checkpoint import Checkpoint, bf16_to_f32
from .formats import ACTIVATION_DTYPE, MXFP4

SWIGLU_ALPHA = reference.SWIGLU_ALPHA


def round_activations(a: np.ndarray, precision: str) -> np.ndarray:
    """What crossing the expert boundary does to activations at this precision. Every backend
    applies it, so a cluster and a single device compute on identical numbers whether the
    boundary is a function call or a network hop."""
    if ACTIVATION_DTYPE[precision] != "q16":
        return a
    from . import native  # the same bits as formats.q16_quantize (tested), without numpy's temporaries

    return native.q16_round(np.ascontiguousarray(a, np.float32))


@dataclass(frozen=True)
class ExpertShape:
    n_experts: int
    hidden: int
    inter: int
    swiglu_limit: float
    swiglu_alpha: float = SWIGLU_ALPHA
    top_k: int = 0  # experts per token: the width of every expert-id row (0: not known here)


PIECE_FIELDS = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")


@dataclass(frozen=True)
class LayerExperts:
    """Views of one layer's packed expert tensors (gpt-oss Hugging Face layout), zero-copy from a
    checkpoint or compact copies of the experts a node hosts.

    A *piece* is one expert's six arrays concatenated in PIECE_FIELDS order: the unit of
    placement, transfer and caching.
    """

    gate_up_blocks: np.ndarray  # [E, 2I, H/32, 16] u8
    gate_up_scales: np.ndarray  # [E, 2I, H/32] u8
    gate_up_bias: np.ndarray  # [E, 2I] bf16 as u16
    down_blocks: np.ndarray  # [E, H, I/32, 16] u8
    down_scales: np.ndarray  # [E, H, I/32] u8
    down_bias: np.ndarray  # [E, H] bf16 as u16

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, prefix: str, shape: ExpertShape) -> "LayerExperts":
        """One layer's experts, whose tensors are named prefix + gate_up_proj_blocks etc. (the
        model family, or a node's assignment, says where a layer's experts sit)."""
        E, H, I = shape.n_experts, shape.hidden, shape.inter
        p = prefix
        gu_b, gu_s = MXFP4.packed_shapes(2 * I, H)
        dn_b, dn_s = MXFP4.packed_shapes(H, I)
        return cls(
            ckpt.tensor(p + "gate_up_proj_blocks", (E, *gu_b), ("U8",)),
            ckpt.tensor(p + "gate_up_proj_scales", (E, *gu_s), ("U8",)),
            ckpt.tensor(p + "gate_up_proj_bias", (E, 2 * I), ("BF16",)),
            ckpt.tensor(p + "down_proj_blocks", (E, *dn_b), ("U8",)),
            ckpt.tensor(p + "down_proj_scales", (E, *dn_s), ("U8",)),
            ckpt.tensor(p + "down_proj_bias", (E, H), ("BF16",)),
        )

    def piece(self, expert: int) -> list[np.ndarray]:
        return [getattr(self, f)[expert] for f in PIECE_FIELDS]

    @staticmethod
    def piece_layout(shape: "ExpertShape") -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array in a piece."""
        H, I = shape.hidden, shape.inter
        gu_b, gu_s = MXFP4.packed_shapes(2 * I, H)
        dn_b, dn_s = MXFP4.packed_shapes(H, I)
        u8, u16 = np.dtype(np.uint8), np.dtype("<u2")
        return [(gu_b, u8), (gu_s, u8), ((2 * I,), u16), (dn_b, u8), (dn_s, u8), ((H,), u16)]

    @classmethod
    def piece_nbytes(cls, shape: "ExpertShape") -> int:
        return sum(int(np.prod(s)) * d.itemsize for s, d in cls.piece_layout(shape))

    @classmethod
    def stack(cls, pieces: list[bytes | memoryview], shape: "ExpertShape", allocate=None) -> "LayerExperts":
        """Compact arrays [len(pieces), ...] from raw pieces; `allocate(nbytes)` gives the memory."""
        layout = cls.piece_layout(shape)
        arrays = []
        for i, (s, d) in enumerate(layout):
            n = len(pieces)
            nbytes = n * int(np.prod(s)) * d.itemsize
            buf = allocate(nbytes) if allocate else bytearray(nbytes)
            arrays.append(np.frombuffer(buf, d, count=n * int(np.prod(s))).reshape((n, *s)))
        offsets = np.cumsum([0] + [int(np.prod(s)) * d.itemsize for s, d in layout])
        for j, raw in enumerate(pieces):
            raw = memoryview(raw).cast("B")
            if len(raw) != offsets[-1]:
                raise ValueError(f"piece {j}: {len(raw)} bytes, expected {offsets[-1]}")
            for i, (s, d) in enumerate(layout):
                arrays[i][j] = np.frombuffer(raw[offsets[i]:offsets[i + 1]], d).reshape(s)
        return cls(*arrays)


class ExpertBackend(ABC):
    """Computes the selected experts of one layer for a batch of tokens."""

    @abstractmethod
    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        """x [T, H] float32, expert_ids [T, k] int32 -> unweighted outputs [T, k, H] float32."""


class ReferenceExpertBackend(ExpertBackend):
    """Pure numpy: dequantize each selected expert and apply the reference FFN."""

    def __init__(self, layers: dict[int, LayerExperts], shape: ExpertShape):
        self.layers, self.shape = layers, shape

    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        w = self.layers[layer]
        out = np.zeros(expert_ids.shape + (x.shape[1],), np.float32)
        for e in np.unique(expert_ids):
            t, slot = np.nonzero(expert_ids == e)
            w1 = MXFP4.dequant(w.gate_up_blocks[e], w.gate_up_scales[e])
            w2 = MXFP4.dequant(w.down_blocks[e], w.down_scales[e])
            out[t, slot] = reference.expert_ffn(
                x[t], w1, bf16_to_f32(w.gate_up_bias[e]), w2, bf16_to_f32(w.down_bias[e]),
                self.shape.swiglu_alpha, self.shape.swiglu_limit)
        return out


class NativeExpertBackend(ExpertBackend):
    """The native fused MXFP4 kernels, reading the mapped checkpoint bytes in place."""

    def __init__(self, layers: dict[int, LayerExperts], shape: ExpertShape, precision: str = "exact"):
        from . import native  # imported here so the numpy reference works without the extension

        self._native, self.layers, self.shape, self.precision = native, layers, shape, precision

    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        x = round_activations(x, self.precision)
        out = native_experts(self._native, self.layers[layer], self.shape, x, expert_ids, self.precision)
        return round_activations(out, self.precision)


def native_experts(native, w: LayerExperts, shape: ExpertShape, x: np.ndarray, expert_ids: np.ndarray,
                   precision: str) -> np.ndarray:
    """One native call: unweighted outputs [T, k, H] (zeros where an id is -1)."""
    out = np.empty(expert_ids.shape + (x.shape[1],), np.float32)
    native.moe_experts(
        np.ascontiguousarray(x, np.float32), np.ascontiguousarray(expert_ids, np.int32),
        w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks, w.down_scales, w.down_bias,
        out, precision=precision, swiglu_alpha=shape.swiglu_alpha, swiglu_limit=shape.swiglu_limit)
    return out
