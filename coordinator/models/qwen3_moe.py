"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): its config, its weights, and the dense part a
coordinator computes.

Against gpt-oss (models/layers.py has the shared math): each head's queries and keys get their
own RMSNorm before RoPE; no sinks, no sliding window, no biases; plain RoPE unless the config asks
for YaRN; the router takes a softmax over all experts and keeps the top k, renormalised when
`norm_topk_prob`; experts are bf16, one tensor per expert and projection, with the plain SwiGLU.
Configs are read as the hub ships them (`num_experts`, `rope_theta`, `rope_scaling`) and as
transformers 5 writes them (`num_local_experts`, `rope_parameters`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expert_node.checkpoint import Checkpoint, CheckpointError
from expert_node.experts import EXPERT_FORMATS, ExpertBackend, ExpertShape

from .layers import (NO_SINK, KVCache, LayerOps, Linear, MoeTransformer, check_layers, dense_matrix, matrix_arrays,
                     nonfinite_weights, rope_yarn)

MODEL_TYPE = "qwen3_moe"
# Where a layer's experts sit in a Qwen3-MoE checkpoint ("{layer}": the layer number); expert e's
# projections follow as "{e}.gate_proj.weight" etc. (expert_node.experts.Bf16LayerExperts).
EXPERTS_PREFIX = "model.layers.{layer}.mlp.experts."
ROPE_TYPES = ("default", "yarn")

__all__ = ["MODEL_TYPE", "EXPERTS_PREFIX", "Qwen3MoeConfig", "Qwen3MoeModel", "build_model", "expert_shape",
           "nonfinite_weights", "router_softmax_topk", "chat_format"]


@dataclass(frozen=True)
class Qwen3MoeConfig:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    vocab_size: int
    attention_bias: bool
    tie_word_embeddings: bool
    rope_theta: float
    rope_factor: float
    rope_beta_fast: float
    rope_beta_slow: float
    rope_original_max_positions: int
    rope_truncate: bool
    max_position_embeddings: int
    rms_norm_eps: float
    sliding_window: int = 0  # no sliding layers (KVCache asks)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3MoeConfig":
        try:
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            cfg = cls(
                num_hidden_layers=int(d["num_hidden_layers"]),
                hidden_size=int(d["hidden_size"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d["num_key_value_heads"]),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
                num_local_experts=int(d["num_experts"] if "num_experts" in d else d["num_local_experts"]),
                num_experts_per_tok=int(d["num_experts_per_tok"]),
                moe_intermediate_size=int(d["moe_intermediate_size"]),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                vocab_size=int(d["vocab_size"]),
                attention_bias=bool(d.get("attention_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_factor=float(rope.get("factor", 1.0)) if rope_type == "yarn" else 1.0,
                rope_beta_fast=float(rope.get("beta_fast", 32.0)),
                rope_beta_slow=float(rope.get("beta_slow", 1.0)),
                rope_original_max_positions=int(rope.get("original_max_position_embeddings",
                                                         d.get("max_position_embeddings", 32768))),
                rope_truncate=bool(rope.get("truncate", True)),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: missing or invalid Qwen3-MoE key ({e})") from None
        problems = []
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
        if any(rope.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim")):
            problems.append("YaRN's attention_factor / mscale are not supported (the factor's default is)")
        if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1:
            problems.append("dense MLP layers (mlp_only_layers, decoder_sparse_step > 1) are not supported")
        if d.get("use_sliding_window"):
            problems.append("use_sliding_window is not supported")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if cfg.head_dim % 2:
            problems.append("head_dim must be even (half-split RoPE)")
        if cfg.hidden_size % 32 or cfg.moe_intermediate_size % 32:
            problems.append("hidden_size and moe_intermediate_size must be multiples of 32")
        if not 0 < cfg.num_experts_per_tok <= cfg.num_local_experts:
            problems.append("num_experts_per_tok must be in 1..num_experts")
        if problems:
            raise CheckpointError("config.json: " + "; ".join(problems))
        return cfg

    def is_sliding(self, layer: int) -> bool:
        return False


def router_softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts by logit (ties: lower id first), weighted by the softmax over all experts
    (Qwen3-MoE without norm_topk_prob; with it, the weights are layers.router_topk's)."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int32)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    return idx, np.take_along_axis(probs, idx, axis=-1).astype(np.float32)


@dataclass(frozen=True)
class AttentionWeights:
    input_norm: np.ndarray  # float32 [H]
    q: np.ndarray  # bf16 [nq*d, H]
    q_bias: np.ndarray | None
    k: np.ndarray
    k_bias: np.ndarray | None
    v: np.ndarray
    v_bias: np.ndarray | None
    o: np.ndarray  # bf16 [H, nq*d]
    o_bias: np.ndarray | None
    q_norm: np.ndarray  # float32 [d]
    k_norm: np.ndarray
    post_norm: np.ndarray
    router: np.ndarray  # bf16 [E, H]


class Qwen3MoeModel(MoeTransformer):
    """Qwen3-MoE's weights and its attention and router; the passes are MoeTransformer's."""

    def __init__(self, ckpt: Checkpoint, linear: Linear, experts: ExpertBackend, ops: LayerOps = LayerOps()):
        self.cfg = cfg = Qwen3MoeConfig.from_dict(ckpt.config)
        self.linear, self.experts, self.ops = linear, experts, ops
        H, V, E, d = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.head_dim
        qw, kvw = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.embed = ckpt.tensor("model.embed_tokens.weight", (V, H), ("BF16",))
        self.lm_head = self.embed if cfg.tie_word_embeddings else dense_matrix(ckpt, "lm_head.weight", (V, H))
        self.final_norm = ckpt.float_tensor("model.norm.weight", (H,))
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            w = lambda n, s: ckpt.tensor(p + n, s, ("BF16",))  # noqa: E731
            m = lambda n, s: dense_matrix(ckpt, p + n, s)  # noqa: E731  (bf16, or Q8 where converted so)
            f = lambda n, s: ckpt.float_tensor(p + n, s)  # noqa: E731
            b = lambda n, s: f(n, s) if cfg.attention_bias else None  # noqa: E731
            self.layers.append(AttentionWeights(
                f("input_layernorm.weight", (H,)),
                m("self_attn.q_proj.weight", (qw, H)), b("self_attn.q_proj.bias", (qw,)),
                m("self_attn.k_proj.weight", (kvw, H)), b("self_attn.k_proj.bias", (kvw,)),
                m("self_attn.v_proj.weight", (kvw, H)), b("self_attn.v_proj.bias", (kvw,)),
                m("self_attn.o_proj.weight", (H, qw)), b("self_attn.o_proj.bias", (H,)),
                f("self_attn.q_norm.weight", (d,)), f("self_attn.k_norm.weight", (d,)),
                f("post_attention_layernorm.weight", (H,)),
                w("mlp.gate.weight", (E, H)),
            ))
        self.no_sinks = np.full(cfg.num_attention_heads, NO_SINK, np.float32)
        self.inv_freq, self.concentration = rope_yarn(cfg)

    def weight_arrays(self) -> list[np.ndarray]:
        """The mapped dense weights (what the coordinator itself reads per token)."""
        arrays = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else matrix_arrays(self.lm_head))
        for w in self.layers:
            arrays += [a for v in vars(w).values() if v is not None for a in matrix_arrays(v)]
        return arrays

    def _head_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMSNorm over each head's d values (x [T, heads, d])."""
        T, heads, d = x.shape
        return self.ops.rmsnorm(x.reshape(T * heads, d), w, self.cfg.rms_norm_eps).reshape(T, heads, d)

    def attention(self, i: int, x: np.ndarray, rows: list[slice], caches: list[KVCache], pos: np.ndarray,
                  rope: tuple[np.ndarray, np.ndarray], linear: Linear) -> np.ndarray:
        cfg, w = self.cfg, self.layers[i]
        xn = self.ops.rmsnorm(x, w.input_norm, cfg.rms_norm_eps)
        T, d = x.shape[0], cfg.head_dim
        q = self._head_norm(linear(xn, w.q, w.q_bias).reshape(T, cfg.num_attention_heads, d), w.q_norm)
        k = self._head_norm(linear(xn, w.k, w.k_bias).reshape(T, cfg.num_key_value_heads, d), w.k_norm)
        v = linear(xn, w.v, w.v_bias).reshape(T, cfg.num_key_value_heads, d)
        q, k = self.ops.rotate(q, *rope), self.ops.rotate(k, *rope)
        parts = []
        for r, cache in zip(rows, caches):
            keys, vals, kpos = cache.extend(i, k[r], v[r], pos[r])
            parts.append(self.ops.attend(q[r], keys, vals, self.no_sinks, pos[r], kpos, None))
        return linear(parts[0] if len(parts) == 1 else np.concatenate(parts), w.o, w.o_bias)

    def route(self, i: int, xn: np.ndarray, linear: Linear) -> tuple[np.ndarray, np.ndarray]:
        logits = linear(xn, self.layers[i].router, None)
        if self.cfg.norm_topk_prob:  # softmax over the top k = their share of the full softmax, renormalised
            return self.ops.topk(logits, self.cfg.num_experts_per_tok)
        return router_softmax_topk(logits, self.cfg.num_experts_per_tok)


def experts_format(config: dict) -> str:
    """bf16 as the hub ships Qwen3-MoE; what `moemesh convert` wrote into quantization_config."""
    qc = config.get("quantization_config") or {}
    if not qc:
        return "bf16"
    if qc.get("quant_method") != "moemesh" or qc.get("experts") not in EXPERT_FORMATS:
        raise CheckpointError(f"config.json: quantization_config {qc} is not one moemesh reads (quant_method "
                              f"'moemesh', experts one of {', '.join(EXPERT_FORMATS)}: what `moemesh convert` writes)")
    return qc["experts"]


def expert_shape(config: dict) -> ExpertShape:
    cfg = Qwen3MoeConfig.from_dict(config)  # a missing or invalid key: a CheckpointError naming it
    # swiglu_limit / alpha: unused by the plain SwiGLU
    return ExpertShape(cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size, swiglu_limit=math.inf,
                       swiglu_alpha=1.0, top_k=cfg.num_experts_per_tok, format=experts_format(config),
                       activation="swiglu")


def chat_format(tok):
    """Qwen3 talks ChatML with a think block."""
    from ..chatml import ChatMLFormat

    return ChatMLFormat(tok)


def build_model(ckpt: Checkpoint, linear: Linear, experts: ExpertBackend, ops: LayerOps = LayerOps()) -> Qwen3MoeModel:
    check_layers(ckpt, Qwen3MoeConfig.from_dict(ckpt.config).num_hidden_layers)
    return Qwen3MoeModel(ckpt, linear, experts, ops)
