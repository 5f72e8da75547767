"""Model families, chosen by config.json's `model_type`: one module per family.

A family module provides `MODEL_TYPE`, `build_model(checkpoint, linear, experts, ops)` (which
checks the config against the tensors; ops: the reference steps or their native twins),
`expert_shape(config)`, `expert_spec(config)` (what a node must know to host the experts: the
wire's ExpertSpec), `load_layer_experts(checkpoint, layers)`
`nonfinite_weights(checkpoint)` (where a NaN or Inf sits, for a failed forward pass) and
`chat_format(tokenizer)` (harmony.HarmonyFormat, chatml.ChatMLFormat: prompts and reply parsing).
"""
from __future__ import annotations

from types import ModuleType

from expert_node.checkpoint import Checkpoint, CheckpointError

from . import gpt_oss, qwen3_moe

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (gpt_oss, qwen3_moe)}


def family_of(ckpt: Checkpoint) -> ModuleType:
    model_type = ckpt.config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{ckpt.folder / 'config.json'}: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]
