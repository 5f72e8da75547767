"""The building blocks every model family shares: the reference functions of a decoder layer
(RMSNorm, RoPE with YaRN, grouped-query attention with optional sink logits and a sliding window,
top-k routing, the experts' weighted sum), the KV cache, and MoeTransformer, which strings a
family's attention and router around the expert backend for one or many sequences.

Written first for gpt-oss (spec/gpt-oss.md §2, whose section numbers the docstrings cite); a
family without a feature passes its neutral value (no sinks: NO_SINK logits; no window: None).
Activations are float32.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from expert_node.checkpoint import Checkpoint, CheckpointError, bf16_to_f32
from expert_node.experts import ExpertPieces, ExpertShape, experts_format
from expert_node.formats import Q8
from expert_node.protocol import layer_prefix

from ..tracing import NULL_TRACER

# Rows of a bf16 weight widened at once by the numpy linear: bounds the fp32 temporary (~90 MB
# for the 201088 x 2880 unembedding) without a full fp32 copy of any matrix.
REFERENCE_ROW_CHUNK = 8192

Linear = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Reference functions (spec/gpt-oss.md §2). Short, unoptimised, float32.

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w in float32; w multiplies directly (no 1 + w)."""
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def rope_yarn(cfg) -> tuple[np.ndarray, float]:
    """YaRN 'NTK-by-parts' inverse frequencies [head_dim/2] and the concentration C (§2.4); plain
    RoPE (C = 1) when the config's factor is at most 1. cfg: head_dim, rope_theta, rope_factor,
    rope_beta_fast/slow, rope_original_max_positions, rope_truncate.

    truncate=false (gpt-oss) keeps the correction range unrounded; the range is clamped to
    [0, dim-1] as Hugging Face does.
    """
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if factor <= 1.0:
        return (1.0 / pos_freqs).astype(np.float32), 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    inv = (1.0 / pos_freqs) * (1 - ramp) + (1.0 / (factor * pos_freqs)) * ramp
    concentration = 0.1 * math.log(factor) + 1.0
    return inv.astype(np.float32), concentration


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray, concentration: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, 1, d/2] of the rotation angles at `positions`, both carrying C. Every layer
    rotates by the same angles, so a forward pass makes them once."""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    return ((np.cos(angles) * np.float32(concentration))[:, None, :],
            (np.sin(angles) * np.float32(concentration))[:, None, :])


def rotate_half_split(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rotation of x [T, heads, d]: element i pairs with i + d/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# Rows from which the native bf16 matmul uses matrix tiles (csrc/kernels.h kTileTokens): a batch of
# sequences stays below it (MoeTransformer.forward_batch).
BATCH_ROWS_ALONE = 16
# The sink logit of a family without sinks: finite (the native kernels refuse Inf) and so far
# below any score that its softmax term is an exact zero.
NO_SINK = -1e30
ATTENTION_QUERY_CHUNK = 128  # queries per score matrix: bounds its memory on long prompts


def softmax_with_sinks(scores, sinks, q_pos, k_pos, window, d) -> np.ndarray:
    """Raw scores q.k [heads, T, S] of head dimension d -> attention weights: / sqrt(d), keys a
    query cannot see masked, softmax over the rest and the head's sink logit, which joins only the
    denominator. (The engine runs the whole attention natively, native.attend; this softmax's native
    twin, native.attention_softmax, only for head dimensions that kernel lacks.)"""
    scores = scores / np.float32(math.sqrt(d))
    masked = k_pos[None, :] > q_pos[:, None]
    if window is not None:
        masked |= k_pos[None, :] <= q_pos[:, None] - window
    scores = np.where(masked, np.float32(-np.inf), scores)
    sink = sinks.reshape(-1, 1, 1).astype(np.float32)
    m = np.maximum(scores.max(axis=-1, keepdims=True), sink)
    p = np.exp(scores - m)
    z = p.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    return p / z


def attention_with_sinks(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray,
    q_pos: np.ndarray, k_pos: np.ndarray, window: int | None, softmax=softmax_with_sinks,
) -> np.ndarray:
    """Causal GQA attention with one learned sink logit per query head (§2.5, §2.6).

    q [T, nq, d], k/v [S, nkv, d] at absolute positions q_pos [T], k_pos [S]. The sink joins the
    softmax denominator only. A window of W keeps keys j with t - W < j <= t. Queries go in chunks,
    each against only the keys some query of the chunk can see (a sliding layer's window, not the
    whole prompt), so a long prompt costs neither quadratic memory nor masked-out work.
    softmax: softmax_with_sinks or a native twin with its signature.
    """
    T, nq, d = q.shape
    in_order = k_pos.size < 2 or bool((k_pos[1:] > k_pos[:-1]).all())  # full layers: a slice, no copy
    out = np.empty((T, nq * d), np.float32)
    for a in range(0, T, ATTENTION_QUERY_CHUNK):
        b = min(T, a + ATTENTION_QUERY_CHUNK)
        lo = -np.inf if window is None else q_pos[a] - window
        if in_order:
            keys = slice(np.searchsorted(k_pos, lo, side="right"), np.searchsorted(k_pos, q_pos[b - 1], side="right"))
        else:
            keys = (k_pos > lo) & (k_pos <= q_pos[b - 1])
            if keys.all():
                keys = slice(None)  # a decoded token sees its whole ring: no copy
        out[a:b] = attend_chunk(q[a:b], k[keys], v[keys], sinks, q_pos[a:b], k_pos[keys], window, softmax)
    return out


def attend_chunk(q, k, v, sinks, q_pos, k_pos, window, softmax=softmax_with_sinks) -> np.ndarray:
    T, nq, d = q.shape
    S, nkv = k.shape[0], k.shape[1]
    group = nq // nkv
    # One matmul per kv head with its query group stacked as rows, on strided views BLAS reads in
    # place (einsum, or broadcasting the heads, re-read or copied the keys for every query head).
    qg = q.reshape(T, nkv, group, d).transpose(1, 2, 0, 3).reshape(nkv, group * T, d)
    scores = (qg @ k.transpose(1, 2, 0)).reshape(nkv * group, T, S)  # heads in query-head order
    p = softmax(scores, sinks, q_pos, k_pos, window, d)
    out = p.reshape(nkv, group * T, S) @ v.transpose(1, 0, 2)  # [nkv, group*T, d]
    return out.reshape(nkv, group, T, d).transpose(2, 0, 1, 3).reshape(T, nq * d).astype(np.float32)


def router_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts by logit (ties: lower expert id first) and softmax over those k only."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int32)
    top = np.take_along_axis(logits, idx, axis=-1)
    e = np.exp(top - top.max(axis=-1, keepdims=True))
    return idx, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def combine_experts(outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_slot weights[t, slot] * outputs[t, slot] in slot order 0..k-1: one fixed order, so a
    cluster and a single device add the same numbers the same way."""
    acc = outputs[:, 0] * weights[:, 0:1]
    for slot in range(1, outputs.shape[1]):
        acc = acc + outputs[:, slot] * weights[:, slot:slot + 1]
    return acc


def add_experts(x: np.ndarray, outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The residual stream after a layer's experts: x + their weighted sum."""
    return x + combine_experts(outputs, weights)


# Where `convert --dense q8` puts a matrix's scales: beside it, under its name with this suffix.
Q8_SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class Q8Matrix:
    """A dense matrix `moemesh convert --dense q8` stored in 8 bits (llama.cpp's Q8_0): int8 values
    [N, K] under the matrix's own name, fp16 scales [N, K/32] (as uint16 bits) under name + "_scale".
    Half a bf16 matrix's bytes, read by the same native kernels as the 8-bit copy made at load."""
    values: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def arrays(self) -> list[np.ndarray]:
        return [self.values, self.scales]

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as float32, exactly (formats.q8_dequant)."""
        v = self.values[r0:r1]
        return Q8.dequant(v.reshape(v.shape[0], -1, Q8.block_size), self.scales[r0:r1])


def matrix_arrays(w) -> list[np.ndarray]:
    """The arrays a weight matrix is stored in (one for bf16, values and scales for Q8)."""
    return w.arrays if isinstance(w, Q8Matrix) else [w]


def dense_matrix(ckpt: Checkpoint, name: str, shape: tuple[int, int]):
    """A dense matrix as the checkpoint stores it: bf16 (uint16 bits), or a Q8Matrix where it is int8."""
    if ckpt.info(name)[1] == "I8":
        rows, cols = shape
        scales = ckpt.tensor(name + Q8_SCALE_SUFFIX, (rows, cols // Q8.block_size), ("F16",))
        return Q8Matrix(ckpt.tensor(name, shape, ("I8",)), scales.view(np.uint16))
    return ckpt.tensor(name, shape, ("BF16",))


def reference_linear(x: np.ndarray, w, b: np.ndarray | None) -> np.ndarray:
    """x [T, K] @ w[N, K]^T (+ b), w bf16-as-uint16 (or a Q8Matrix) widened a chunk of rows at a time."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    for r in range(0, w.shape[0], REFERENCE_ROW_CHUNK):
        rows = (w.rows_f32(r, r + REFERENCE_ROW_CHUNK) if isinstance(w, Q8Matrix)
                else bf16_to_f32(w[r:r + REFERENCE_ROW_CHUNK]))
        out[:, r:r + REFERENCE_ROW_CHUNK] = x @ rows.T
    return out if b is None else out + b


class LayerOps(NamedTuple):
    """The model's steps besides matmuls and experts, the reference ones by default. The engine
    builds the model with native twins (coordinator.engine.NATIVE_OPS) of the same signatures and
    results within float rounding: on a decoded token numpy's per-call cost, not arithmetic, is
    their time."""
    attend: Callable = attention_with_sinks
    rmsnorm: Callable = rmsnorm
    rotate: Callable = rotate_half_split
    topk: Callable = router_topk
    add_experts: Callable = add_experts


# ---------------------------------------------------------------------------------------------
# The model.

class KVCache:
    """Per-layer keys (already rotated) and values with their absolute positions.

    Full-attention layers append into a buffer that doubles when full (amortised O(1) per token);
    sliding layers keep a ring of the last `sliding_window` + RING_SLACK entries (slot = position
    mod its size), so their memory is O(window) however long the context grows.

    Speculative decoding forwards a chunk of drafts and then truncates the cache to what was
    accepted. The slack lets a chunk of up to RING_SLACK tokens go into the ring slot by slot
    without overwriting an entry any of its queries sees, and makes truncation free: a rejected
    token overwrote only an entry no later query can see. The chunk's queries then attend over the
    same array, at the same indices, as each token decoded alone would (only masked keys differ),
    so they get the same bits (see csrc/attention.h, kParts).
    """

    RING_SLACK = 16

    def __init__(self, cfg, initial_capacity: int = 256):
        """cfg: num_hidden_layers, num_key_value_heads, head_dim, sliding_window and is_sliding(layer)."""
        self.cfg = cfg
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        self._cap = [cfg.sliding_window + self.RING_SLACK if cfg.is_sliding(i) else initial_capacity
                     for i in range(cfg.num_hidden_layers)]
        self.k = [np.zeros((c, *shape), np.float32) for c in self._cap]
        self.v = [np.zeros((c, *shape), np.float32) for c in self._cap]
        self.pos = [np.full(c, -1, np.int64) for c in self._cap]  # -1 = empty slot
        self.length = 0  # tokens seen so far = position of the next token

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def snapshot(self) -> tuple:
        """The state after `length` tokens, to come back to after more were added. Full layers
        need only the length (later tokens go after it); sliding rings are copied (their later
        tokens overwrite slots), 2 x window x kv heads x head_dim floats per sliding layer."""
        rings = {i: (self.k[i].copy(), self.v[i].copy(), self.pos[i].copy())
                 for i in range(self.cfg.num_hidden_layers) if self.cfg.is_sliding(i)}
        return self.length, rings

    def restore(self, snapshot: tuple) -> None:
        self.length, rings = snapshot
        for i, (k, v, pos) in rings.items():
            self.k[i][:], self.v[i][:], self.pos[i][:] = k, v, pos

    def truncate(self, length: int) -> None:
        """Forget every token from position `length` on (rejected drafts: at most RING_SLACK back)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.length - length > self.RING_SLACK:
            raise ValueError(f"a cache rolls back at most {self.RING_SLACK} tokens, not {self.length - length}")
        for i in range(self.cfg.num_hidden_layers):
            if self.cfg.is_sliding(i):
                self.pos[i][self.pos[i] >= length] = -1
        self.length = length

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray):
        """Store new entries; return the keys, values and positions the new queries attend to."""
        if self.cfg.is_sliding(layer) and len(pos) <= self.RING_SLACK:
            return self._ring_steps(layer, k, v, pos)
        if self.cfg.is_sliding(layer):
            filled = self.pos[layer] >= 0
            keys = np.concatenate([self.k[layer][filled], k])
            vals = np.concatenate([self.v[layer][filled], v])
            kpos = np.concatenate([self.pos[layer][filled], pos])
            keep = min(len(kpos), self._cap[layer])  # ring slot = position mod window
            slots = kpos[-keep:] % self._cap[layer]
            self.k[layer][slots], self.v[layer][slots], self.pos[layer][slots] = keys[-keep:], vals[-keep:], kpos[-keep:]
            return keys, vals, kpos
        n = int(pos[0])  # full layers hold positions 0..n-1 in order
        if n + len(pos) > self._cap[layer]:
            cap = max(2 * self._cap[layer], n + len(pos))
            for store in (self.k, self.v):
                grown = np.zeros((cap, *store[layer].shape[1:]), np.float32)
                grown[:n] = store[layer][:n]
                store[layer] = grown
            grown_pos = np.full(cap, -1, np.int64)
            grown_pos[:n] = self.pos[layer][:n]
            self.pos[layer], self._cap[layer] = grown_pos, cap
        end = n + len(pos)
        self.k[layer][n:end], self.v[layer][n:end], self.pos[layer][n:end] = k, v, pos
        return self.k[layer][:end], self.v[layer][:end], self.pos[layer][:end]

    def _ring_steps(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray):
        """Decoded tokens (or a verified chunk) in a sliding layer take the slots of entries a ring
        behind them, which none of their queries sees; the ring's slots up to the last one written
        (positions 0.. fill slots 0.., so a prefix) are returned as views in ring order (no copies)."""
        slots = pos % self._cap[layer]
        self.k[layer][slots], self.v[layer][slots], self.pos[layer][slots] = k, v, pos
        n = min(int(pos[-1]) + 1, self._cap[layer])
        return self.k[layer][:n], self.v[layer][:n], self.pos[layer][:n]


class MoeTransformer:
    """Embedding, attention, router and head on the coordinator; experts behind a backend.

    A family's model sets cfg (num_hidden_layers, vocab_size, num_experts_per_tok, rms_norm_eps),
    linear, experts, ops, embed, lm_head, final_norm, layers (each with q, k, v, o and post_norm), inv_freq and
    concentration, and defines attention() and route(); the passes over tokens are shared.
    """

    tracer = NULL_TRACER

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg)

    def matmul_weights(self) -> list[np.ndarray]:
        """The big matrices read through `linear` every token (not the small router): bf16, or
        Q8Matrix where the checkpoint stores them in 8 bits."""
        return [m for w in self.layers for m in (w.q, w.k, w.v, w.o)] + [self.lm_head]

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True,
                router_log: list | None = None) -> np.ndarray:
        """Run tokens `ids` after what `cache` holds; logits [T, V] (or [1, V] for the last token).

        router_log, if given, receives (layer, expert ids [T, k]) for every layer.
        """
        return self.forward_batch([(ids, cache, all_logits)], router_log)[0]

    def forward_batch(self, batch: list[tuple[np.ndarray, KVCache, bool]],
                      router_log: list | None = None) -> list[np.ndarray]:
        """One pass over several sequences, each (ids, its cache, all_logits): the rows of all of
        them go through every matmul and the experts together (a cluster: one round per layer
        for all), each attends over its own cache. Logits per sequence, as forward() returns them.

        Batching must not change a sequence's numbers, and the bf16 matrix tiles round
        differently from the vector kernels a lone decode uses (csrc/ops.cpp bf16_matmul: whole
        groups of 16 rows), so with more than one sequence the matmuls go kTileTokens - 1 rows at
        a time: every row then gets the bits it gets alone. The tiles stay for prefill, which runs
        one sequence per pass. (The experts' tiles are bit-identical to their vector kernels.)
        """
        cfg = self.cfg
        rows, start, pos, all_ids = [], 0, [], []
        for ids, cache, _ in batch:
            ids = np.asarray(ids, np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError("ids: expected a non-empty 1-D sequence of token ids")
            if ids.min() < 0 or ids.max() >= cfg.vocab_size:
                raise ValueError(f"ids: token ids must be in [0, {cfg.vocab_size})")
            rows.append(slice(start, start + ids.size))
            start += ids.size
            pos.append(np.arange(cache.length, cache.length + ids.size, dtype=np.int64))
            all_ids.append(ids)
        ids, pos = np.concatenate(all_ids), np.concatenate(pos)
        caches = [cache for _, cache, _ in batch]
        linear = self.linear if len(batch) == 1 else self._rows_alone
        tr = self.tracer
        with tr.span("embed", tokens=int(ids.size)):
            x = bf16_to_f32(self.embed[ids])
        rope = rope_tables(pos, self.inv_freq, self.concentration)
        for i in range(cfg.num_hidden_layers):
            with tr.span("attention", layer=i):
                x = x + self.attention(i, x, rows, caches, pos, rope, linear)
            with tr.span("router", layer=i):
                xn = self.ops.rmsnorm(x, self.layers[i].post_norm, cfg.rms_norm_eps)
                expert_ids, weights = self.route(i, xn, linear)
            if router_log is not None:
                router_log.append((i, expert_ids))
            with tr.span("experts", layer=i):
                outputs = self.experts.run(i, xn, expert_ids)
            with tr.span("combine", layer=i):
                x = self.ops.add_experts(x, outputs, weights)
        for r, cache in zip(rows, caches):
            cache.length += r.stop - r.start
        keep = [r if all_logits else slice(r.stop - 1, r.stop) for r, (_, _, all_logits) in zip(rows, batch)]
        with tr.span("unembed"):
            h = self.ops.rmsnorm(np.concatenate([x[r] for r in keep]), self.final_norm, cfg.rms_norm_eps)
            logits = linear(h, self.lm_head, None)
        bounds = np.cumsum([0] + [r.stop - r.start for r in keep])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _rows_alone(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """`linear` kTileTokens - 1 rows at a time (see forward_batch)."""
        if x.shape[0] < BATCH_ROWS_ALONE:
            return self.linear(x, w, b)
        return np.concatenate([self.linear(x[a:a + BATCH_ROWS_ALONE - 1], w, b)
                               for a in range(0, x.shape[0], BATCH_ROWS_ALONE - 1)])


def load_experts(ckpt: Checkpoint, shape: ExpertShape, prefix: str, layers) -> dict[int, ExpertPieces]:
    """Each layer's experts in `shape.format`, read where `prefix` ('{layer}': its number) says."""
    fmt = experts_format(shape)
    return {i: fmt.from_checkpoint(ckpt, layer_prefix(prefix, i), shape) for i in layers}


def expert_spec_for(shape: ExpertShape, n_layers: int, prefix: str):
    """The wire's ExpertSpec of a family's experts: everything a node needs, no model config."""
    from expert_node.proto import moemesh_pb2 as pb

    return pb.ExpertSpec(format=shape.format, activation=shape.activation, layers=n_layers,
                         experts=shape.n_experts, experts_per_token=shape.top_k, hidden=shape.hidden,
                         intermediate=shape.inter, swiglu_alpha=shape.swiglu_alpha,
                         swiglu_limit=shape.swiglu_limit, tensor_prefix=prefix)


def check_layers(ckpt: Checkpoint, n_layers: int, also_fix: str = "") -> None:
    """config.json must describe every layer the tensors hold: a trimmed num_hidden_layers once
    ran silently on 3 of 4 layers."""
    held = {int(m.group(1)) for m in map(re.compile(r"model\.layers\.(\d+)\.").match, ckpt.tensor_names) if m}
    extra = sorted(held - set(range(n_layers)))
    if extra:
        name = next(t for t in ckpt.tensor_names if t.startswith(f"model.layers.{extra[0]}."))
        raise CheckpointError(f"{ckpt.folder / 'config.json'}: num_hidden_layers is {n_layers}, but the checkpoint "
                              f"holds layer {extra[0]} ('{name}' in {ckpt.where(name).name}); fix num_hidden_layers"
                              f"{also_fix}")


def nonfinite_weights(ckpt: Checkpoint) -> str | None:
    """Where NaN or Inf sits among the float weights, or None: what a forward pass that produced
    NaN reports instead of the activation it surfaced in."""
    return ckpt.first_nonfinite([n for n in ckpt.tensor_names if not n.endswith(("_blocks", "_scales"))])
