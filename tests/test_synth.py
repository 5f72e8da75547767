"""`moemesh synth`: the full-size plan matches the published gpt-oss-20b sizes, output is seeded
and byte-identical, and the files are what the safetensors library and our loader expect."""
import hashlib
import json

import numpy as np
import pytest
from safetensors import safe_open

from coordinator import shards, synth
from coordinator.cli import main
from expert_node.checkpoint import Checkpoint


def test_gpt_oss_20b_plan_matches_the_spec_sizes():
    plan = synth.tensor_plan(synth.make_config("gpt-oss-20b"))
    by = lambda pred: sum(t.nbytes for t in plan if pred(t.name))  # noqa: E731
    assert sum(t.nbytes for t in plan) == 13_761_264_768
    assert by(lambda n: n.endswith("_blocks")) == 9_555_148_800
    assert by(lambda n: n.endswith("_scales")) == 597_196_800
    assert by(lambda n: "experts" in n and n.endswith("_bias")) == 13_271_040
    assert by(lambda n: "embed" in n) == by(lambda n: n.startswith("lm_head")) == 1_158_266_880
    assert by(lambda n: ".self_attn." in n or "input_layernorm" in n) == 1_274_545_152
    shapes = {t.name: (t.shape, t.dtype) for t in plan}
    assert shapes["model.layers.23.mlp.experts.gate_up_proj_blocks"] == ((32, 5760, 90, 16), "U8")
    assert shapes["model.layers.0.mlp.experts.down_proj_scales"] == ((32, 2880, 90), "U8")
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == ((4096, 2880), "BF16")
    assert shapes["model.layers.0.self_attn.sinks"] == ((64,), "BF16")
    names = shards.shard_names(len(shards.shard_plan(plan, shards.DEFAULT_SHARD_BYTES)))
    assert names == [f"model-0000{i}-of-00002.safetensors" for i in range(3)]


def test_gpt_oss_120b_plan_total():
    plan = synth.tensor_plan(synth.make_config("gpt-oss-120b"))
    assert sum(t.nbytes for t in plan) == 65_248_815_744


def test_qwen3_30b_a3b_plan_matches_the_published_sizes():
    """30,532,122,624 parameters in bf16 (the hub index's total_size); 128 experts of 3 projections."""
    cfg = synth.make_config("qwen3-30b-a3b")
    plan = synth.tensor_plan(cfg)
    assert sum(t.nbytes for t in plan) == 61_064_245_248
    shapes = {t.name: (t.shape, t.dtype) for t in plan}
    assert shapes["model.layers.47.mlp.experts.127.down_proj.weight"] == ((2048, 768), "BF16")
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == ((128,), "BF16")
    assert shapes["model.layers.0.mlp.gate.weight"] == ((128, 2048), "BF16")
    mx = synth.tensor_plan(synth.with_quantized_experts(cfg))
    assert {t.name: t.shape for t in mx}["model.layers.3.mlp.experts.gate_up_proj_blocks"] == (128, 1536, 64, 16)
    assert sum(t.nbytes for t in mx) == 18_483_671_040


@pytest.mark.parametrize("experts", ["mxfp4", "q4", "q8"])
def test_qwen3_with_quantized_experts_loads_and_its_kernels_match_the_reference(tmp_path, experts):
    from coordinator import Engine

    cfg = synth.with_quantized_experts(synth.make_config("qwen3-tiny"), experts)
    folder = synth.write_checkpoint(tmp_path, cfg, seed=5, progress=False)
    ids = np.arange(500, 530)
    ref = Engine.load(folder, precision="reference").logits(ids)
    assert np.abs(Engine.load(folder, precision="exact").logits(ids) - ref).max() <= 1e-3
    assert np.abs(Engine.load(folder, precision="fast").logits(ids) - ref).max() <= 2e-2


def test_dry_run_prints_the_plan(capsys):
    assert main(["synth", "--preset", "gpt-oss-20b", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == 13_761_264_768 and len(out["shards"]) == 3
    # Qwen3-30B-A3B's experts in each format: 128 experts x 48 layers x 3 projections of 768 x 2048
    expert_weights = 128 * 48 * 3 * 768 * 2048
    sizes = {}
    for experts in ("bf16", "mxfp4", "q4", "q8"):
        assert main(["synth", "--preset", "qwen3-30b-a3b", "--experts", experts, "--dry-run"]) == 0
        sizes[experts] = json.loads(capsys.readouterr().out)["total_bytes"]
    assert sizes["bf16"] - sizes["mxfp4"] == expert_weights * (2 - 17 / 32)
    assert sizes["q4"] - sizes["mxfp4"] == expert_weights // 32 and sizes["q8"] - sizes["q4"] == expert_weights // 2
    assert main(["synth", "--preset", "tiny", "--experts", "q4", "--dry-run"]) == 2
    assert "applies to Qwen3-MoE presets" in capsys.readouterr().err


def digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_seeded_output_is_byte_identical(tmp_path):
    cfg = synth.make_config("tiny")
    a = synth.write_checkpoint(tmp_path / "a", cfg, seed=7, progress=False)
    b = synth.write_checkpoint(tmp_path / "b", cfg, seed=7, progress=False)
    c = synth.write_checkpoint(tmp_path / "c", cfg, seed=8, progress=False)
    assert digest(a) == digest(b) != digest(c)


def test_files_follow_the_hugging_face_layout(wide_dir):
    cfg = json.loads((wide_dir / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["rope_scaling"]["truncate"] is False
    index = json.loads((wide_dir / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(wide_dir)
    total = 0
    for name, shard in index["weight_map"].items():
        with safe_open(wide_dir / shard, framework="numpy") as f:
            assert name in f.keys()
        total += ckpt.tensor(name).nbytes
    assert total == index["metadata"]["total_size"]
    for f in ("tokenizer.json", "generation_config.json"):
        assert (wide_dir / f).exists()


def test_weights_exercise_sinks_biases_and_the_clamp(tiny_dir):
    from coordinator import Engine
    from expert_node.formats import MXFP4

    engine = Engine.load(tiny_dir, precision="reference")
    layer = engine.model.layers[0]
    assert np.abs(layer.sinks).min() > 0 and np.abs(layer.q_bias).max() > 0.05
    # gate/up pre-activations of normalised inputs reach beyond +-7 for a share of units
    ex = engine.model.experts.layers[0]
    w1 = MXFP4.dequant(ex.gate_up_blocks[0], ex.gate_up_scales[0])
    x = np.random.default_rng(0).standard_normal((64, w1.shape[1])).astype(np.float32)
    h = x @ w1.T
    assert 0.01 < (np.abs(h) > 7).mean() < 0.5
