"""`moemesh synth`: write a random gpt-oss or Qwen3-MoE checkpoint in exactly the Hugging Face layout.

Real weights cannot be downloaded here, so tests and benchmarks run on checkpoints this module
writes: same tensor names, shapes and dtypes. gpt-oss: MXFP4 experts with valid codes and scales,
`quantization_config`, shard naming and index file as OpenAI's converter writes them, plus the
real o200k_harmony tokenizer. Qwen3-MoE: bf16 tensors, one per expert and projection, and a
stand-in tokenizer with Qwen3's special ids (coordinator.tokenizer says why). Weights are random (seeded, byte-identical run to run) at scales
chosen so every feature of the math is exercised: non-zero biases and sinks, and gate/up
pre-activations that hit the ±7 SwiGLU clamp. Full-size presets stream to disk in bounded memory.
"""
from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from expert_node.checkpoint import SAFETENSORS_DTYPES, f32_to_bf16
from expert_node.formats import FP4_VALUES, MXFP4, QUANT_FORMATS

from . import tokenizer as tokenizer_mod
from .shards import CHUNK_BYTES, DEFAULT_SHARD_BYTES, write_shards

# rms of the values uniformly drawn codes stand for, by format (the scale brings them to a weight's size)
CODE_RMS = {"mxfp4": float(np.sqrt(np.mean(np.square(FP4_VALUES)))),
            "q4": float(np.sqrt(np.mean(np.square(np.arange(-8, 8))))),
            "q8": float(np.sqrt(np.mean(np.square(np.arange(-128, 128)))))}

BASE_CONFIG = {  # openai/gpt-oss-20b config.json (spec/gpt-oss.md §1.1)
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                     "pad_token_id": 199999}

QWEN3_BASE_CONFIG = {  # Qwen/Qwen3-30B-A3B config.json
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                           "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
BASE_CONFIGS = {"gpt_oss": BASE_CONFIG, "qwen3_moe": QWEN3_BASE_CONFIG}
GENERATION_CONFIGS = {"gpt_oss": GENERATION_CONFIG, "qwen3_moe": QWEN3_GENERATION_CONFIG}
TOKENIZERS = {"gpt_oss": tokenizer_mod.HARMONY, "qwen3_moe": tokenizer_mod.QWEN3_STANDIN}

# Presets: overrides of BASE_CONFIG. The tiny ones keep the real vocabulary (the tokenizer's ids
# reach 200018) and make every sequence feature reachable in a few dozen tokens: a short window,
# a short original context for YaRN. `gate_up_gain` sets how often the SwiGLU clamp is hit.
PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 4, "experts_per_token": 4,
             "intermediate_size": 64, "sliding_window": 8, "initial_context_length": 32,
             "max_position_embeddings": 1024,
             "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                              "original_max_position_embeddings": 32, "rope_type": "yarn", "truncate": False}},
    "tiny-wide": {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
                  "head_dim": 32, "num_local_experts": 6, "num_experts_per_tok": 2, "experts_per_token": 2,
                  "intermediate_size": 32, "sliding_window": 16, "initial_context_length": 40,
                  "max_position_embeddings": 160, "rope_theta": 10000,
                  "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 4.0,
                                   "original_max_position_embeddings": 40, "rope_type": "yarn", "truncate": False}},
    "gpt-oss-20b": {},
    "gpt-oss-120b": {"num_hidden_layers": 36, "num_local_experts": 128},
    # Qwen3-MoE (a "model_type" key picks the family's base config): the tiny ones keep the real
    # vocabulary; the second covers the other branches (the full softmax's top-k weights, YaRN,
    # tied embeddings, attention biases) and transformers 5's key names.
    "qwen3-tiny": {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 3,
                   "moe_intermediate_size": 32, "intermediate_size": 96, "max_position_embeddings": 1024,
                   "max_window_layers": 3},
    "qwen3-tiny-wide": {"model_type": "qwen3_moe", "hidden_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 32, "num_local_experts": 6,
                        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "intermediate_size": 128,
                        "norm_topk_prob": False, "tie_word_embeddings": True, "attention_bias": True,
                        "max_position_embeddings": 160, "max_window_layers": 2, "rope_theta": None,
                        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 40}},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe"},
}


def with_quantized_experts(cfg: dict, experts: str = "mxfp4") -> dict:
    """A Qwen3-MoE config whose checkpoint holds quantized experts (mxfp4, q4, q8), as `moemesh
    convert` writes them (synth writes MXFP4 when the bf16 experts would not fit the disk)."""
    if cfg.get("model_type") != "qwen3_moe":
        raise ValueError("only Qwen3-MoE presets have bf16 experts to write quantized (gpt-oss's are MXFP4)")
    if experts not in QUANT_FORMATS:
        raise ValueError(f"experts must be one of {', '.join(QUANT_FORMATS)}, got {experts!r}")
    return dict(cfg, quantization_config={"quant_method": "moemesh", "experts": experts, "source_experts": "bf16"})


def make_config(preset: str | None = "gpt-oss-20b", overrides: dict | None = None) -> dict:
    """A full HF config.json dict: the family's base (gpt-oss-20b, Qwen3-30B-A3B), a preset's
    changes, then `overrides`; a key set to None by the preset is dropped."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    patches = (PRESETS.get(preset or "", {}), overrides or {})
    family = next((p["model_type"] for p in reversed(patches) if "model_type" in p), "gpt_oss")
    cfg = copy.deepcopy(BASE_CONFIGS[family])
    for patch in patches:
        cfg.update(copy.deepcopy(patch))
    if family == "qwen3_moe":
        if "num_local_experts" in cfg:  # transformers 5's name for num_experts
            cfg.pop("num_experts", None)
        return {k: v for k, v in cfg.items() if not (v is None and PRESETS.get(preset or "", {}).get(k, 0) is None)}
    n = int(cfg["num_hidden_layers"])
    if "layer_types" not in (overrides or {}) or len(cfg.get("layer_types", [])) != n:
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return cfg


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    init: str  # how values are drawn (see _draw)
    gain: float = 1.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * SAFETENSORS_DTYPES[self.dtype].itemsize


def tensor_plan(cfg: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in the order it is written."""
    return qwen3_tensor_plan(cfg) if cfg.get("model_type") == "qwen3_moe" else gpt_oss_tensor_plan(cfg)


def qwen3_tensor_plan(cfg: dict) -> list[TensorSpec]:
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    E = cfg.get("num_experts", cfg.get("num_local_experts"))
    I, d = cfg["moe_intermediate_size"], cfg.get("head_dim") or H // cfg["num_attention_heads"]
    qw, kvw = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    bias = cfg.get("attention_bias", False)
    plan = [TensorSpec("model.embed_tokens.weight", (V, H), "BF16", "normal", 1.0)]
    for i in range(L):
        p = f"model.layers.{i}."
        plan += [TensorSpec(p + "input_layernorm.weight", (H,), "BF16", "norm")]
        for name, shape in (("q_proj", (qw, H)), ("k_proj", (kvw, H)), ("v_proj", (kvw, H)), ("o_proj", (H, qw))):
            plan.append(TensorSpec(p + f"self_attn.{name}.weight", shape, "BF16", "linear"))
            if bias:
                plan.append(TensorSpec(p + f"self_attn.{name}.bias", shape[:1], "BF16", "normal", 0.2))
        plan += [TensorSpec(p + "self_attn.q_norm.weight", (d,), "BF16", "norm"),
                 TensorSpec(p + "self_attn.k_norm.weight", (d,), "BF16", "norm"),
                 TensorSpec(p + "post_attention_layernorm.weight", (H,), "BF16", "norm"),
                 TensorSpec(p + "mlp.gate.weight", (E, H), "BF16", "linear", 2.0)]
        quantized = (cfg.get("quantization_config") or {}).get("experts")
        if quantized in QUANT_FORMATS:  # as `moemesh convert` writes them
            q = QUANT_FORMATS[quantized]
            gu_b, gu_s = q.packed_shapes(2 * I, H)
            dn_b, dn_s = q.packed_shapes(H, I)
            plan += [TensorSpec(p + "mlp.experts.gate_up_proj_blocks", (E, *gu_b), q.values_dtype, f"{q.name}_codes"),
                     TensorSpec(p + "mlp.experts.gate_up_proj_scales", (E, *gu_s), q.scales_dtype, f"{q.name}_scales",
                                2.0),
                     TensorSpec(p + "mlp.experts.down_proj_blocks", (E, *dn_b), q.values_dtype, f"{q.name}_codes"),
                     TensorSpec(p + "mlp.experts.down_proj_scales", (E, *dn_s), q.scales_dtype, f"{q.name}_scales",
                                1.0)]
            continue
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            plan += [TensorSpec(q + "gate_proj.weight", (I, H), "BF16", "linear", 2.0),
                     TensorSpec(q + "up_proj.weight", (I, H), "BF16", "linear", 2.0),
                     TensorSpec(q + "down_proj.weight", (H, I), "BF16", "linear")]
    plan.append(TensorSpec("model.norm.weight", (H,), "BF16", "norm"))
    if not cfg.get("tie_word_embeddings"):
        plan.append(TensorSpec("lm_head.weight", (V, H), "BF16", "linear", 4.0))
    return plan


def gpt_oss_tensor_plan(cfg: dict) -> list[TensorSpec]:
    H, V, E, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["num_hidden_layers"]
    I, d = cfg["intermediate_size"], cfg["head_dim"]
    qw, kvw = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    tiny = H < 1024  # tiny models push gate/up into the clamp; full-size ones use milder scales
    plan = [TensorSpec("model.embed_tokens.weight", (V, H), "BF16", "normal", 1.0)]
    for i in range(L):
        p = f"model.layers.{i}."
        gu_b, gu_s = MXFP4.packed_shapes(2 * I, H)
        dn_b, dn_s = MXFP4.packed_shapes(H, I)
        plan += [
            TensorSpec(p + "input_layernorm.weight", (H,), "BF16", "norm"),
            TensorSpec(p + "self_attn.q_proj.weight", (qw, H), "BF16", "linear"),
            TensorSpec(p + "self_attn.q_proj.bias", (qw,), "BF16", "normal", 0.2),
            TensorSpec(p + "self_attn.k_proj.weight", (kvw, H), "BF16", "linear"),
            TensorSpec(p + "self_attn.k_proj.bias", (kvw,), "BF16", "normal", 0.2),
            TensorSpec(p + "self_attn.v_proj.weight", (kvw, H), "BF16", "linear"),
            TensorSpec(p + "self_attn.v_proj.bias", (kvw,), "BF16", "normal", 0.2),
            TensorSpec(p + "self_attn.o_proj.weight", (H, qw), "BF16", "linear"),
            TensorSpec(p + "self_attn.o_proj.bias", (H,), "BF16", "normal", 0.2),
            TensorSpec(p + "self_attn.sinks", (cfg["num_attention_heads"],), "BF16", "normal", 1.5),
            TensorSpec(p + "post_attention_layernorm.weight", (H,), "BF16", "norm"),
            TensorSpec(p + "mlp.router.weight", (E, H), "BF16", "linear", 2.0),
            TensorSpec(p + "mlp.router.bias", (E,), "BF16", "normal", 0.5),
            TensorSpec(p + "mlp.experts.gate_up_proj_blocks", (E, *gu_b), "U8", "mxfp4_codes"),
            TensorSpec(p + "mlp.experts.gate_up_proj_scales", (E, *gu_s), "U8", "mxfp4_scales", 4.0 if tiny else 1.0),
            TensorSpec(p + "mlp.experts.gate_up_proj_bias", (E, 2 * I), "BF16", "normal", 0.5),
            TensorSpec(p + "mlp.experts.down_proj_blocks", (E, *dn_b), "U8", "mxfp4_codes"),
            TensorSpec(p + "mlp.experts.down_proj_scales", (E, *dn_s), "U8", "mxfp4_scales", 1.0),
            TensorSpec(p + "mlp.experts.down_proj_bias", (E, H), "BF16", "normal", 0.2),
        ]
    plan += [TensorSpec("model.norm.weight", (H,), "BF16", "norm"),
             TensorSpec("lm_head.weight", (V, H), "BF16", "linear", 4.0)]
    return plan


def _draw(spec: TensorSpec, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values for one chunk of a tensor (leading axis sliced), already in storage dtype."""
    if spec.init.endswith("_codes"):  # uniform random codes (MXFP4, Q4) or int8 values (Q8)
        return np.frombuffer(rng.bytes(int(np.prod(shape))), np.dtype(SAFETENSORS_DTYPES[spec.dtype])).reshape(shape)
    if spec.init.endswith("_scales"):
        # Scale so a row's weights have rms ~ gain / sqrt(fan_in); a factor of 2 of jitter per block.
        q = QUANT_FORMATS[spec.init.removesuffix("_scales")]
        fan_in = shape[-1] * q.block_size
        log2 = math.log2(spec.gain / math.sqrt(fan_in) / CODE_RMS[q.name]) + rng.integers(-1, 2, size=shape)
        if q.name == "mxfp4":
            return (127 + np.round(log2)).astype(np.uint8)
        return np.exp2(log2).astype(np.float16).view(np.uint16)
    if spec.init == "norm":
        values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif spec.init == "linear":
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.gain / math.sqrt(spec.shape[-1]))
    else:  # "normal"
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.gain)
    return f32_to_bf16(values)


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[bytes]:
    """The tensor's bytes in pieces of at most ~CHUNK_BYTES; the seed depends on the name only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode())]))
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    rows = max(1, CHUNK_BYTES // row_bytes)
    for r in range(0, spec.shape[0], rows):
        n = min(rows, spec.shape[0] - r)
        yield np.ascontiguousarray(_draw(spec, rng, (n, *spec.shape[1:]))).tobytes()


def write_checkpoint(out_dir: str | Path, cfg: dict, seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool | None = None) -> Path:
    """Write config, weights (streamed), index, generation config and tokenizer into out_dir."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(cfg)
    with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc=f"synth {out.name}",
              disable=None if progress is None else not progress) as bar:
        write_shards(out, plan, lambda t: tensor_chunks(t, seed), max_shard_bytes, cfg.get("model_type", "gpt_oss"),
                     bar)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    family = cfg.get("model_type", "gpt_oss")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIGS[family], indent=2))
    tokenizer_mod.write_tokenizer_files(out, TOKENIZERS[family])
    return out
