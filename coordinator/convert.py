"""`moemesh convert`: a bf16 checkpoint's experts to a quantized format moemesh loads directly.

Qwen3-MoE ships bf16 experts, one tensor per expert and projection (~61 GB for 30B-A3B). The
converter streams them expert by expert into gpt-oss's fused layout (gate and up rows
interleaved; expert_node.experts.LayerExperts, without biases) in one of expert_node.formats'
formats — MXFP4, Q4 (int4 per 32 with an fp16 scale) or Q8 — so the native kernels and nodes
serve them, and copies every other tensor as it is. Memory holds one expert's projections
and one layer's scales at a time; output is written tensor by tensor into shards with an index,
as the hub's snapshots are, and config.json records the format in quantization_config
({"quant_method": "moemesh", "experts": "q4", "dense": "bf16"}), which the model family reads.
`dense="q8"` stores the attention projections and the unembedding in 8 bits too (Q8, as
llama.cpp's quantized models keep their dense tensors in Q8_0; models.layers.Q8Matrix).

MXFP4's shared power-of-two scale was made for a model trained with it (gpt-oss); a bf16-trained
model loses less to Q4's finer scale. The cost is measured after converting (`accuracy`: mean KL
divergence and top-1 agreement of the next-token distributions against the source on fixed
prompts).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from expert_node.checkpoint import INDEX_NAME, Checkpoint, CheckpointError
from expert_node.formats import Q8, QUANT_FORMATS, QuantFormat
from expert_node.protocol import layer_prefix

from .models import family_of
from .models.layers import Q8_SCALE_SUFFIX
from .shards import CHUNK_BYTES, DEFAULT_SHARD_BYTES, write_shards

# Q4 by default: on a bf16-trained model about half MXFP4's accuracy cost, as fast (README's figures).
EXPERT_FORMATS = ("mxfp4", "q4", "q8")
DENSE_FORMATS = ("bf16", "q8")
# What --dense q8 stores in 8 bits: the attention projections and the unembedding, the matrices every
# token reads through the model's linear (MoeTransformer.matmul_weights). The embedding table (one
# row a token), norms, biases and the router stay as they are.
Q8_DENSE = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight|lm_head\.weight")
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1}


@dataclass(frozen=True)
class Planned:
    """One output tensor: its header entry and how its bytes are made, in order."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_BYTES[self.dtype]


def copied(ckpt: Checkpoint, name: str) -> Planned:
    shape, dtype = ckpt.info(name)

    def chunks() -> Iterator[bytes]:
        a = ckpt.tensor(name)
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, flat.size, CHUNK_BYTES):
            yield flat[i:i + CHUNK_BYTES].tobytes()
        ckpt.release(a)  # read once: its pages need not stay in this process
    return Planned(name, tuple(shape), dtype, chunks)


def quantized_layer(ckpt: Checkpoint, prefix: str, quant: QuantFormat, n_experts: int, hidden: int,
                    inter: int) -> list[Planned]:
    """One layer's bf16 experts (prefix + '{e}.gate_proj.weight' ...) as the fused tensors of `quant`.
    Blocks stream expert by expert; their scales, made on the way, are written right after."""
    scales: dict[str, list[bytes]] = {"gate_up": [], "down": []}

    def quantized(e: int, which: str) -> np.ndarray:
        """One expert's fused gate/up or down projection, quantized by the native twin of the
        format's numpy quantizer (the same bytes, tested); its source pages dropped once read."""
        from expert_node import native

        names = [f"{prefix}{e}.{proj}.weight" for proj in (("gate_proj", "up_proj") if which == "gate_up"
                                                           else ("down_proj",))]
        sources = [ckpt.tensor(n) for n in names]
        if which == "gate_up":
            w = np.empty((2 * inter, hidden), np.uint16)
            w[0::2], w[1::2] = sources  # gate even, up odd (reference.split_gate_up)
        else:
            w = sources[0]
        blocks_shape, scales_shape = quant.packed_shapes(*w.shape)
        blocks = np.empty(blocks_shape, quant.values_np)
        s = np.empty(scales_shape, quant.scales_np)
        try:
            native.quantize(quant.name, w, blocks, s)
        except ValueError as err:  # NaN or Inf in the source
            raise CheckpointError(f"{ckpt.where(names[0])}: {' or '.join(names)}: {err}") from None
        for a in sources:
            ckpt.release(a)
        scales[which].append(s.tobytes())
        return blocks

    def blocks(which: str) -> Callable[[], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            scales[which].clear()
            for e in range(n_experts):
                yield quantized(e, which).tobytes()
        return chunks

    def scale_chunks(which: str) -> Callable[[], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            if len(scales[which]) != n_experts:
                raise RuntimeError("scales are written right after their blocks")
            yield from scales[which]
            scales[which].clear()
        return chunks

    gu_b, gu_s = quant.packed_shapes(2 * inter, hidden)
    dn_b, dn_s = quant.packed_shapes(hidden, inter)
    v, sc = quant.values_dtype, quant.scales_dtype
    return [Planned(prefix + "gate_up_proj_blocks", (n_experts, *gu_b), v, blocks("gate_up")),
            Planned(prefix + "gate_up_proj_scales", (n_experts, *gu_s), sc, scale_chunks("gate_up")),
            Planned(prefix + "down_proj_blocks", (n_experts, *dn_b), v, blocks("down")),
            Planned(prefix + "down_proj_scales", (n_experts, *dn_s), sc, scale_chunks("down"))]


def q8_dense(ckpt: Checkpoint, name: str) -> list[Planned]:
    """A bf16 matrix [N, K] as Q8 (models.layers.Q8Matrix): int8 values under its name, then fp16
    scales under name + Q8_SCALE_SUFFIX, made a band of rows at a time (the native twin of
    formats.q8_quantize)."""
    (rows, cols), scales = ckpt.info(name)[0], []
    band = max(1, CHUNK_BYTES // (2 * cols))

    def values() -> Iterator[bytes]:
        from expert_node import native

        w = ckpt.tensor(name, (rows, cols), ("BF16",))
        scales.clear()
        for r in range(0, rows, band):
            part = w[r:r + band]
            v = np.empty((part.shape[0], cols // Q8.block_size, Q8.block_size), np.int8)
            s = np.empty((part.shape[0], cols // Q8.block_size), np.uint16)
            try:
                native.quantize("q8", part, v, s)
            except ValueError as err:  # NaN or Inf in the source
                raise CheckpointError(f"{ckpt.where(name)}: {name} (rows from {r}): {err}") from None
            scales.append(s.tobytes())
            yield v.tobytes()
        ckpt.release(w)

    def scale_chunks() -> Iterator[bytes]:
        yield from scales
        scales.clear()
    return [Planned(name, (rows, cols), "I8", values),
            Planned(name + Q8_SCALE_SUFFIX, (rows, cols // Q8.block_size), "F16", scale_chunks)]


def plan(ckpt: Checkpoint, experts: str, dense: str = "bf16") -> tuple[list[Planned], dict]:
    """The output's tensors in write order, and its config.json."""
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"--experts must be one of {', '.join(EXPERT_FORMATS)}, got {experts!r}")
    if dense not in DENSE_FORMATS:
        raise ValueError(f"--dense must be one of {', '.join(DENSE_FORMATS)}, got {dense!r}")
    family = family_of(ckpt)
    shape = family.expert_shape(ckpt.config)
    if shape.format != "bf16":
        raise CheckpointError(f"{ckpt.folder}: its experts are {shape.format} already; convert reads bf16 experts "
                              f"(Qwen3-MoE as the hub ships it)")
    n_layers = int(ckpt.config["num_hidden_layers"])
    prefixes = [layer_prefix(family.EXPERTS_PREFIX, i) for i in range(n_layers)]
    out, converted = [], set()
    for name in ckpt.tensor_names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            dims, dtype = ckpt.info(name)
            q8 = dense == "q8" and Q8_DENSE.fullmatch(name) and dtype == "BF16" and dims[-1] % Q8.block_size == 0
            out += q8_dense(ckpt, name) if q8 else [copied(ckpt, name)]
            continue
        expected = {f"{prefix}{e}.{proj}.weight" for e in range(shape.n_experts)
                    for proj in ("gate_proj", "up_proj", "down_proj")}
        if name not in expected:
            raise CheckpointError(f"{ckpt.where(name)}: tensor '{name}' is not one of the experts' projections "
                                  f"convert knows ({prefix}{{e}}.gate_proj/up_proj/down_proj.weight)")
        if prefix not in converted:  # the layer's first expert tensor: its fused tensors go here
            converted.add(prefix)
            out += quantized_layer(ckpt, prefix, QUANT_FORMATS[experts], shape.n_experts, shape.hidden, shape.inter)
    config = dict(ckpt.config, quantization_config={"quant_method": "moemesh", "experts": experts,
                                                    "source_experts": shape.format, "dense": dense})
    return out, config


def convert(src: str | Path, dst: str | Path, experts: str = "q4", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool | None = None, dense: str = "bf16") -> Path:
    """Write src's conversion into dst (created; an existing checkpoint there is refused)."""
    from tqdm import tqdm

    ckpt = Checkpoint(src)
    tensors, config = plan(ckpt, experts, dense)
    out = Path(dst)
    if out.resolve() == Path(src).resolve() or (out / "config.json").exists():
        raise CheckpointError(f"{out}: holds a checkpoint already; convert writes into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=f"convert {out.name}",
              disable=None if progress is None else not progress) as bar:
        write_shards(out, tensors, lambda t: t.chunks(), max_shard_bytes, config["model_type"], bar)
    for f in Path(src).iterdir():  # tokenizer, generation config, chat template, licence ...
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX_NAME, "config.json"):
            shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def log_softmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    m = a.max(axis=-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True))


def accuracy(src: str | Path, dst: str | Path, prompts: int = 4, tokens: int = 32, precision: str = "exact") -> dict:
    """What converting cost: mean KL(source || converted) of the next-token distributions over
    every position of fixed prompts (seeded token ids), and top-1 agreement."""
    from .engine import Engine

    a, b = Engine.load(src, precision=precision), Engine.load(dst, precision=precision)
    vocab = min(a.config.vocab_size, 150_000)
    kls, agree = [], []
    for seed in range(prompts):
        ids = np.random.default_rng(seed).integers(0, vocab, tokens)
        la, lb = log_softmax(a.logits(ids)), log_softmax(b.logits(ids))
        kls += list((np.exp(la) * (la - lb)).sum(axis=-1))
        agree += list(la.argmax(axis=-1) == lb.argmax(axis=-1))
    return {"mean_kl": float(np.mean(kls)), "top1_agreement": float(np.mean(agree)), "positions": len(kls)}
