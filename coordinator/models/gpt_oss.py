"""gpt-oss (20b, 120b): its config, its weights, and the dense part a coordinator computes.

The decoder's math (spec/gpt-oss.md §2) is in models/layers.py, shared with other families: here
are gpt-oss's choices — attention with biases and one sink logit per head, sliding-window layers
alternating with full ones, YaRN, a router with a bias and softmax over the top k, MXFP4 experts
with the clamped SwiGLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expert_node.checkpoint import Checkpoint, CheckpointError
from expert_node.experts import ExpertBackend, ExpertShape

from .layers import (KVCache, Linear, LayerOps, MoeTransformer, check_layers, dense_matrix, matrix_arrays,
                     nonfinite_weights, rope_yarn)

MODEL_TYPE = "gpt_oss"

__all__ = ["MODEL_TYPE", "EXPERTS_PREFIX", "GptOssConfig", "GptOssModel", "build_model", "expert_shape",
           "nonfinite_weights", "chat_format"]


@dataclass(frozen=True)
class GptOssConfig:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float
    rope_factor: float
    rope_beta_fast: float
    rope_beta_slow: float
    rope_original_max_positions: int
    rope_truncate: bool
    max_position_embeddings: int
    rms_norm_eps: float
    swiglu_limit: float

    @classmethod
    def from_dict(cls, d: dict) -> "GptOssConfig":
        try:
            rs = d.get("rope_scaling") or d.get("rope_parameters") or {}
            n_layers = int(d["num_hidden_layers"])
            layer_types = tuple(d.get("layer_types") or
                                ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)])
            cfg = cls(
                num_hidden_layers=n_layers,
                hidden_size=int(d["hidden_size"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d["num_key_value_heads"]),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
                num_local_experts=int(d["num_local_experts"]),
                num_experts_per_tok=int(d.get("num_experts_per_tok", d.get("experts_per_token", 4))),
                intermediate_size=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                sliding_window=int(d["sliding_window"]),
                layer_types=layer_types,
                rope_theta=float(d.get("rope_theta", rs.get("rope_theta", 150000.0))),
                rope_factor=float(rs.get("factor", 1.0)),
                rope_beta_fast=float(rs.get("beta_fast", 32.0)),
                rope_beta_slow=float(rs.get("beta_slow", 1.0)),
                rope_original_max_positions=int(rs.get("original_max_position_embeddings",
                                                       d.get("initial_context_length", 4096))),
                rope_truncate=bool(rs.get("truncate", True)),
                max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: missing or invalid gpt-oss key ({e})") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            problems.append("head_dim must be even (half-split RoPE)")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            problems.append("hidden_size and intermediate_size must be multiples of 32 (MXFP4 blocks)")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            problems.append("num_experts_per_tok must be in 1..num_local_experts")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append("layer_types must list every layer")
        if problems:
            raise CheckpointError("config.json: " + "; ".join(problems))

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


# ---------------------------------------------------------------------------------------------
# The model.

@dataclass(frozen=True)
class AttentionWeights:
    input_norm: np.ndarray  # float32 [H]
    q: np.ndarray  # bf16 [nq*d, H]
    q_bias: np.ndarray
    k: np.ndarray
    k_bias: np.ndarray
    v: np.ndarray
    v_bias: np.ndarray
    o: np.ndarray  # bf16 [H, nq*d]
    o_bias: np.ndarray
    sinks: np.ndarray  # float32 [nq]
    post_norm: np.ndarray
    router: np.ndarray  # bf16 [E, H]
    router_bias: np.ndarray


class GptOssModel(MoeTransformer):
    """gpt-oss's weights and its attention and router; the passes are MoeTransformer's."""

    def __init__(self, ckpt: Checkpoint, linear: Linear, experts: ExpertBackend, ops: LayerOps = LayerOps()):
        self.cfg = cfg = GptOssConfig.from_dict(ckpt.config)
        self.linear, self.experts, self.ops = linear, experts, ops
        H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
        qw, kvw = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.embed = ckpt.tensor("model.embed_tokens.weight", (V, H), ("BF16",))
        self.lm_head = dense_matrix(ckpt, "lm_head.weight", (V, H))
        self.final_norm = ckpt.float_tensor("model.norm.weight", (H,))
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            w = lambda n, s: ckpt.tensor(p + n, s, ("BF16",))  # noqa: E731
            m = lambda n, s: dense_matrix(ckpt, p + n, s)  # noqa: E731  (bf16, or Q8 where converted so)
            f = lambda n, s: ckpt.float_tensor(p + n, s)  # noqa: E731
            self.layers.append(AttentionWeights(
                f("input_layernorm.weight", (H,)),
                m("self_attn.q_proj.weight", (qw, H)), f("self_attn.q_proj.bias", (qw,)),
                m("self_attn.k_proj.weight", (kvw, H)), f("self_attn.k_proj.bias", (kvw,)),
                m("self_attn.v_proj.weight", (kvw, H)), f("self_attn.v_proj.bias", (kvw,)),
                m("self_attn.o_proj.weight", (H, qw)), f("self_attn.o_proj.bias", (H,)),
                f("self_attn.sinks", (cfg.num_attention_heads,)),
                f("post_attention_layernorm.weight", (H,)),
                w("mlp.router.weight", (E, H)), f("mlp.router.bias", (E,)),
            ))
        self.inv_freq, self.concentration = rope_yarn(cfg)

    def weight_arrays(self) -> list[np.ndarray]:
        """The mapped dense weights (what the coordinator itself reads per token)."""
        arrays = [self.embed, *matrix_arrays(self.lm_head), self.final_norm]
        for w in self.layers:
            arrays += [a for v in vars(w).values() for a in matrix_arrays(v)]
        return arrays

    def attention(self, i: int, x: np.ndarray, rows: list[slice], caches: list[KVCache], pos: np.ndarray,
                  rope: tuple[np.ndarray, np.ndarray], linear: Linear) -> np.ndarray:
        """rope: rope_tables at pos. Projections run over every row at once; each sequence's rows
        (`rows`, with their `caches`) attend over their own cache."""
        cfg, w = self.cfg, self.layers[i]
        xn = self.ops.rmsnorm(x, w.input_norm, cfg.rms_norm_eps)
        T, d = x.shape[0], cfg.head_dim
        q = linear(xn, w.q, w.q_bias).reshape(T, cfg.num_attention_heads, d)
        k = linear(xn, w.k, w.k_bias).reshape(T, cfg.num_key_value_heads, d)
        v = linear(xn, w.v, w.v_bias).reshape(T, cfg.num_key_value_heads, d)
        q, k = self.ops.rotate(q, *rope), self.ops.rotate(k, *rope)
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        parts = []
        for r, cache in zip(rows, caches):
            keys, vals, kpos = cache.extend(i, k[r], v[r], pos[r])
            parts.append(self.ops.attend(q[r], keys, vals, w.sinks, pos[r], kpos, window))
        return linear(parts[0] if len(parts) == 1 else np.concatenate(parts), w.o, w.o_bias)

    def route(self, i: int, xn: np.ndarray, linear: Linear) -> tuple[np.ndarray, np.ndarray]:
        w = self.layers[i]
        return self.ops.topk(linear(xn, w.router, w.router_bias), self.cfg.num_experts_per_tok)


# Where a layer's experts sit in a gpt-oss checkpoint ("{layer}": the layer number).
EXPERTS_PREFIX = "model.layers.{layer}.mlp.experts."


def expert_shape(config: dict) -> ExpertShape:
    cfg = GptOssConfig.from_dict(config)  # a missing or invalid key: a CheckpointError naming it
    return ExpertShape(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.swiglu_limit,
                       top_k=cfg.num_experts_per_tok)


def chat_format(tok):
    """gpt-oss talks harmony."""
    from ..harmony import HarmonyFormat

    return HarmonyFormat(tok)


def build_model(ckpt: Checkpoint, linear: Linear, experts: ExpertBackend, ops: LayerOps = LayerOps()) -> GptOssModel:
    check_layers(ckpt, GptOssConfig.from_dict(ckpt.config).num_hidden_layers, " and layer_types")
    return GptOssModel(ckpt, linear, experts, ops)
