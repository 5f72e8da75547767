"""Model families, chosen by config.json's `model_type`: one module per family.

A family module provides `MODEL_TYPE`, `EXPERTS_PREFIX` (where a layer's experts sit in its
checkpoints, '{layer}' the layer's number), `build_model(checkpoint, linear, experts, ops)` (which
checks the config against the tensors; ops: the reference steps or their native twins),
`expert_shape(config)` (the experts' sizes, format and activation), `nonfinite_weights(checkpoint)`
(where a NaN or Inf sits, for a failed forward pass) and `chat_format(tokenizer)`
(harmony.HarmonyFormat, chatml.ChatMLFormat: prompts and reply parsing). What follows from those
for every family is here: the experts a checkpoint holds, and the wire's ExpertSpec of them.
"""
from __future__ import annotations

from types import ModuleType

from expert_node.checkpoint import Checkpoint, CheckpointError

from . import gpt_oss, qwen3_moe
from .layers import expert_spec_for, load_experts

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (gpt_oss, qwen3_moe)}


def family_of(ckpt: Checkpoint) -> ModuleType:
    model_type = ckpt.config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{ckpt.folder / 'config.json'}: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def layer_experts(ckpt: Checkpoint, layers) -> dict:
    """Each of `layers`' experts, views into the checkpoint in its family's expert format."""
    family = family_of(ckpt)
    return load_experts(ckpt, family.expert_shape(ckpt.config), family.EXPERTS_PREFIX, layers)


def expert_spec(ckpt: Checkpoint):
    """What a node must know to host the checkpoint's experts (it reads no model config): their
    format and activation, the shapes, and where they sit in a checkpoint."""
    family = family_of(ckpt)
    return expert_spec_for(family.expert_shape(ckpt.config), int(ckpt.config["num_hidden_layers"]),
                           family.EXPERTS_PREFIX)
