"""Where a layer's experts live in a checkpoint (one class per expert format), and the
ExpertBackend seam.

An ExpertBackend computes, for one layer, every selected expert of every token, unweighted:
out[t, slot] = expert_{ids[t, slot]}(x[t]). The in-process backends (numpy reference, native
kernels) and the remote one (gRPC) all sit behind it, so single-device and cluster runs share the
coordinator's code and give the same numbers. Weighting and summing the slots is the
coordinator's job, in a fixed order (see coordinator.models.layers.combine_experts).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import reference
from .checkpoint import Checkpoint, bf16_to_f32
from .formats import ACTIVATION_DTYPE, MXFP4, Q4, Q8, QuantFormat

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
    format: str = "mxfp4"  # how the weights are stored: a key of EXPERT_FORMATS
    activation: str = "swiglu_clamped"  # reference.ACTIVATIONS: gpt-oss's clamped SwiGLU, or plain "swiglu"


class ExpertPieces:
    """What every expert format shares: a layer's tensors as named fields, each indexable by
    expert (an [E, ...] array, or a list of per-expert arrays where a checkpoint stores one tensor
    per expert). A *piece* is one expert's arrays concatenated in FIELDS order: the unit of
    placement, transfer and caching. A format defines FIELDS, piece_layout, from_checkpoint,
    the expert's float weights for the reference, and its native computation."""

    FIELDS: tuple[str, ...] = ()

    def piece(self, expert: int) -> list[np.ndarray]:
        return [getattr(self, f)[expert] for f in self.FIELDS]

    def arrays(self) -> list[np.ndarray]:
        """Every array the layer reads (what warming the weights touches)."""
        out = []
        for f in self.FIELDS:
            v = getattr(self, f)
            out += list(v) if isinstance(v, list) else [v]
        return out

    @staticmethod
    def piece_layout(shape: "ExpertShape") -> list[tuple[tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    @classmethod
    def piece_nbytes(cls, shape: "ExpertShape") -> int:
        return sum(int(np.prod(s)) * d.itemsize for s, d in cls.piece_layout(shape))

    @classmethod
    def stack(cls, pieces: list[bytes | memoryview], shape: "ExpertShape", allocate=None) -> "ExpertPieces":
        """Compact arrays [len(pieces), ...] from raw pieces; `allocate(nbytes)` gives the memory."""
        layout = cls.piece_layout(shape)
        arrays = []
        for s, d in layout:
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

    def float_weights(self, expert: int) -> tuple[np.ndarray, ...]:
        """(gate [I, H], up [I, H], gate bias, up bias, down [H, I], down bias) as float32: the
        reference's view of one expert, whatever its format."""
        raise NotImplementedError

    def run_native(self, native, shape: "ExpertShape", x: np.ndarray, expert_ids: np.ndarray,
                   precision: str) -> np.ndarray:
        """Unweighted outputs [T, k, H] on the native kernels (zeros where an id is -1)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerExperts(ExpertPieces):
    """Quantized experts in gpt-oss's Hugging Face layout (gate and up rows interleaved in one fused
    tensor, with biases; `moemesh convert` writes other models' experts the same way, without
    biases): views zero-copy from a checkpoint, or compact copies a node hosts. MXFP4 here; the
    subclasses below are the other formats of expert_node.formats (QUANT), tensors named alike."""

    QUANT: ClassVar[QuantFormat] = MXFP4

    gate_up_blocks: np.ndarray  # [E, 2I, H/32, block bytes] (MXFP4, Q4: u8 codes; Q8: i8 values)
    gate_up_scales: np.ndarray  # [E, 2I, H/32] (MXFP4: u8 exponents; Q4, Q8: fp16 bits as u16)
    gate_up_bias: np.ndarray  # [E, 2I] bf16 as u16
    down_blocks: np.ndarray  # [E, H, I/32, block bytes]
    down_scales: np.ndarray  # [E, H, I/32]
    down_bias: np.ndarray  # [E, H] bf16 as u16

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, prefix: str, shape: ExpertShape) -> "LayerExperts":
        """One layer's experts, whose tensors are named prefix + gate_up_proj_blocks etc. (the
        model family, or a node's assignment, says where a layer's experts sit)."""
        E, H, I = shape.n_experts, shape.hidden, shape.inter
        p, q = prefix, cls.QUANT
        gu_b, gu_s = q.packed_shapes(2 * I, H)
        dn_b, dn_s = q.packed_shapes(H, I)

        def scales(name: str, shape: tuple[int, ...]) -> np.ndarray:
            return ckpt.tensor(p + name, shape, (q.scales_dtype,)).view(q.scales_np)  # fp16 scales: their bits

        def bias(name: str, shape: tuple[int, ...]) -> np.ndarray:
            """A model without expert biases (Qwen3-MoE converted) has none: zeros."""
            if p + name in ckpt.tensor_names:
                return ckpt.tensor(p + name, shape, ("BF16",))
            return np.zeros(shape, np.uint16)
        return cls(
            ckpt.tensor(p + "gate_up_proj_blocks", (E, *gu_b), (q.values_dtype,)),
            scales("gate_up_proj_scales", (E, *gu_s)),
            bias("gate_up_proj_bias", (E, 2 * I)),
            ckpt.tensor(p + "down_proj_blocks", (E, *dn_b), (q.values_dtype,)),
            scales("down_proj_scales", (E, *dn_s)),
            bias("down_proj_bias", (E, H)),
        )

    FIELDS = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")

    @classmethod
    def piece_layout(cls, shape: "ExpertShape") -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array in a piece."""
        H, I, q = shape.hidden, shape.inter, cls.QUANT
        gu_b, gu_s = q.packed_shapes(2 * I, H)
        dn_b, dn_s = q.packed_shapes(H, I)
        values, scales, u16 = q.values_np, q.scales_np, np.dtype("<u2")
        return [(gu_b, values), (gu_s, scales), ((2 * I,), u16), (dn_b, values), (dn_s, scales), ((H,), u16)]

    def float_weights(self, expert: int) -> tuple[np.ndarray, ...]:
        w1 = self.QUANT.dequant(self.gate_up_blocks[expert], self.gate_up_scales[expert])
        b1 = bf16_to_f32(self.gate_up_bias[expert])
        gate, up = reference.split_gate_up(w1.T)
        b_gate, b_up = reference.split_gate_up(b1)
        return (gate.T, up.T, b_gate, b_up, self.QUANT.dequant(self.down_blocks[expert], self.down_scales[expert]),
                bf16_to_f32(self.down_bias[expert]))

    def native_values(self, native, precision: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(gate_up values, down values, their layout) as the active kernels read them."""
        return self.gate_up_blocks, self.down_blocks, "natural"

    def run_native(self, native, shape, x, expert_ids, precision):
        """One call into the fused expert kernels of the format."""
        out = np.empty(expert_ids.shape + (x.shape[1],), np.float32)
        gate_up, down, layout = self.native_values(native, precision)
        native.moe_experts(
            np.ascontiguousarray(x, np.float32), np.ascontiguousarray(expert_ids, np.int32),
            gate_up, self.gate_up_scales, self.gate_up_bias, down, self.down_scales,
            self.down_bias, out, precision=precision, swiglu_alpha=shape.swiglu_alpha, swiglu_limit=shape.swiglu_limit,
            activation=shape.activation, format=self.QUANT.name, layout=layout)
        return out


@dataclass(frozen=True)
class Q4LayerExperts(LayerExperts):
    """Q4 experts (int4 per 32 with an fp16 scale: `moemesh convert --experts q4`)."""
    QUANT: ClassVar[QuantFormat] = Q4


@dataclass(frozen=True)
class Q8LayerExperts(LayerExperts):
    """Q8 experts (int8 per 32 with an fp16 scale: `moemesh convert --experts q8`). The fast
    kernels on x86 and dot-product NEON read a chunk's values in an order of their own: the first
    fast run makes that copy of the values and keeps it (twice the memory of the other formats:
    the price of the format that is for accuracy, not size). Exact runs read them as stored."""
    QUANT: ClassVar[QuantFormat] = Q8

    def native_values(self, native, precision: str) -> tuple[np.ndarray, np.ndarray, str]:
        if precision != "fast":
            return self.gate_up_blocks, self.down_blocks, "natural"
        laid_out = self.__dict__.get("_laid_out")
        if laid_out is None or laid_out[2] != native.active_isa():
            gate_up, down = np.array(self.gate_up_blocks), np.array(self.down_blocks)
            layout = native.weight_layout("q8", gate_up)
            native.weight_layout("q8", down)
            laid_out = (gate_up, down, native.active_isa(), layout)
            object.__setattr__(self, "_laid_out", laid_out)  # a cache: the dataclass's fields stay as they are
        return laid_out[0], laid_out[1], laid_out[3]


@dataclass(frozen=True)
class Bf16LayerExperts(ExpertPieces):
    """bf16 experts stored one tensor per expert and projection, without biases (Qwen3-MoE's Hugging
    Face layout: `{prefix}{e}.gate_proj.weight` [I, H], up_proj [I, H], down_proj [H, I]). From a
    checkpoint each field is a list of per-expert views; a node's compact copy stacks them."""

    gate: list | np.ndarray
    up: list | np.ndarray
    down: list | np.ndarray

    FIELDS = ("gate", "up", "down")
    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, prefix: str, shape: ExpertShape) -> "Bf16LayerExperts":
        H, I = shape.hidden, shape.inter
        shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        return cls(*([ckpt.tensor(f"{prefix}{e}.{proj}.weight", shapes[proj], ("BF16",))
                       for e in range(shape.n_experts)] for proj in cls.PROJECTIONS))

    @staticmethod
    def piece_layout(shape: "ExpertShape") -> list[tuple[tuple[int, ...], np.dtype]]:
        H, I, u16 = shape.hidden, shape.inter, np.dtype("<u2")
        return [((I, H), u16), ((I, H), u16), ((H, I), u16)]

    def float_weights(self, expert: int) -> tuple[np.ndarray, ...]:
        gate, up, down = (bf16_to_f32(np.asarray(getattr(self, f)[expert])) for f in self.FIELDS)
        zeros = np.zeros(gate.shape[0], np.float32)
        return gate, up, zeros, zeros, down, np.zeros(down.shape[0], np.float32)

    def run_native(self, native, shape, x, expert_ids, precision):
        """Each selected expert's three projections on the native bf16 matmul, the activation in
        numpy: no fused kernel (this is the unconverted checkpoint's slow path; `moemesh convert`
        makes the fast one). A call takes fewer rows than a matrix-tile group: the vector kernels
        give a row the same bits whatever rows share the call, the tiles' rounding depends on
        them, and a token's numbers must not depend on the other sequences or drafts of its step
        (continuous batching, speculation)."""
        if shape.activation != "swiglu":
            raise ValueError(f"bf16 experts compute the plain SwiGLU, not {shape.activation!r}")
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros(expert_ids.shape + (x.shape[1],), np.float32)
        for e in np.unique(expert_ids[expert_ids >= 0]):
            t, slot = np.nonzero(expert_ids == e)
            rows = np.ascontiguousarray(x[t])
            gate, up = (self._matmul(native, rows, getattr(self, f)[e]) for f in ("gate", "up"))
            out[t, slot] = self._matmul(native, reference.swiglu(gate, up), self.down[e])
        return out

    @staticmethod
    def _matmul(native, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        step = native.TILE_TOKENS - 1
        for a in range(0, x.shape[0], step):
            native.bf16_matmul(np.ascontiguousarray(x[a:a + step], np.float32), w, None, out[a:a + step])
        return out


# Expert formats by the name an ExpertSpec carries.
EXPERT_FORMATS: dict[str, type[ExpertPieces]] = {
    "mxfp4": LayerExperts, "q4": Q4LayerExperts, "q8": Q8LayerExperts, "bf16": Bf16LayerExperts}


def experts_format(shape: ExpertShape) -> type[ExpertPieces]:
    return EXPERT_FORMATS[shape.format]


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
        for e in np.unique(expert_ids[expert_ids >= 0]):
            t, slot = np.nonzero(expert_ids == e)
            out[t, slot] = reference.expert_ffn(x[t], *w.float_weights(e), self.shape)
        return out


class NativeExpertBackend(ExpertBackend):
    """The native kernels of the layers' expert format, reading the mapped checkpoint bytes in place."""

    def __init__(self, layers: dict[int, LayerExperts], shape: ExpertShape, precision: str = "exact"):
        from . import native  # imported here so the numpy reference works without the extension

        self._native, self.layers, self.shape, self.precision = native, layers, shape, precision

    def run(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
        x = round_activations(x, self.precision)
        out = native_experts(self._native, self.layers[layer], self.shape, x, expert_ids, self.precision)
        return round_activations(out, self.precision)


def native_experts(native, w: ExpertPieces, shape: ExpertShape, x: np.ndarray, expert_ids: np.ndarray,
                   precision: str) -> np.ndarray:
    """Unweighted outputs [T, k, H] (zeros where an id is -1) on the native kernels of w's format."""
    return w.run_native(native, shape, x, expert_ids, precision)
