"""`moemesh convert` and the quantizers it uses: bf16 Qwen3-MoE experts to gpt-oss's fused layout in
MXFP4, Q4 or Q8, loaded directly by the engine, the native kernels (plain SwiGLU) and the nodes."""
import json
import subprocess

import numpy as np
import pytest

from support import MOEMESH, TESTS
from coordinator import Engine, cluster
from coordinator.convert import convert
from expert_node.checkpoint import Checkpoint, CheckpointError, bf16_to_f32
from expert_node.formats import FP4_VALUES, Q8, QUANT_FORMATS, mxfp4_dequant, mxfp4_quantize


def brute_force_mxfp4(w: np.ndarray) -> np.ndarray:
    """Per block: the smallest power-of-two scale keeping the block's max within 6, then each
    value's nearest representable value (ties: the even code), dequantized."""
    out = np.empty_like(w)
    for i, block in enumerate(w.reshape(-1, 32)):
        amax = float(np.abs(block).max())
        e = -127 if amax == 0 else next(e for e in range(-127, 128) if amax / 2.0 ** e <= 6)
        grid = FP4_VALUES[:8] * 2.0 ** e
        for j, v in enumerate(block):
            dist = np.abs(np.abs(v) - grid)
            best = np.flatnonzero(dist == dist.min())
            code = best[0] if len(best) == 1 else next(c for c in best if c % 2 == 0)
            out.reshape(-1, 32)[i, j] = np.copysign(grid[code], v)
    return out


def test_mxfp4_quantize_is_the_nearest_value_with_the_smallest_scale():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 64)) * np.exp2(rng.integers(-8, 8, (6, 1)))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :4] = [0.25, 0.75, 2.5, 5.0]  # ties between codes (block max 5: scale 2^0)
    w[2, :32] = np.float32(1024) * (np.float32(1) - np.float32(2.0 ** -24))  # just below a power of two
    blocks, scales = mxfp4_quantize(w)
    np.testing.assert_array_equal(mxfp4_dequant(blocks, scales), brute_force_mxfp4(w))


@pytest.fixture(scope="module", params=list(QUANT_FORMATS))
def converted(request, qwen3_dir, tmp_path_factory):
    return convert(qwen3_dir, tmp_path_factory.mktemp(f"qwen3-{request.param}") / "out", request.param,
                   max_shard_bytes=8_000_000, progress=False)


def test_converted_experts_are_the_quantized_source_and_the_rest_is_copied(qwen3_dir, converted):
    src, out = Checkpoint(qwen3_dir), Checkpoint(converted)
    fmt = QUANT_FORMATS[out.config["quantization_config"]["experts"]]
    assert out.config["quantization_config"] == {"quant_method": "moemesh", "experts": fmt.name,
                                                 "source_experts": "bf16", "dense": "bf16"}
    assert len(set(out._where.values())) > 1  # sharded, with an index
    p = "model.layers.2.mlp.experts."

    def stored(name: str) -> np.ndarray:  # fp16 scales compare as their bits
        a = out.tensor(name)
        return a.view(np.uint16) if a.dtype == np.float16 else a
    for e in (0, 7):
        gate, up = (bf16_to_f32(src.tensor(f"{p}{e}.{w}.weight")) for w in ("gate_proj", "up_proj"))
        fused = np.empty((2 * gate.shape[0], gate.shape[1]), np.float32)
        fused[0::2], fused[1::2] = gate, up
        blocks, scales = fmt.quantize(fused)
        np.testing.assert_array_equal(stored(p + "gate_up_proj_blocks")[e], blocks)
        np.testing.assert_array_equal(stored(p + "gate_up_proj_scales")[e], scales)
        blocks, scales = fmt.quantize(bf16_to_f32(src.tensor(f"{p}{e}.down_proj.weight")))
        np.testing.assert_array_equal(stored(p + "down_proj_blocks")[e], blocks)
        np.testing.assert_array_equal(stored(p + "down_proj_scales")[e], scales)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(out.tensor(name), src.tensor(name))
    assert not any(".experts.0." in n for n in out.tensor_names)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_the_native_plain_swiglu_path_matches_the_reference(converted, precision):
    ids = np.random.default_rng(3).integers(0, 151_643, 40)
    ref = Engine.load(converted, precision="reference").logits(ids)
    got = Engine.load(converted, precision=precision).logits(ids)
    assert np.abs(got - ref).max() <= {"exact": 1e-3, "fast": 2e-2}[precision]


def test_nodes_serve_converted_experts(converted, start_node):
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(2)]
    experts, _ = cluster.connect(Checkpoint(converted), "fast", [n.address for n in nodes], progress=False)
    remote = Engine.load(converted, precision="fast", experts=experts)
    try:
        ids = list(range(2000, 2030))
        np.testing.assert_allclose(remote.logits(ids), Engine.load(converted, precision="fast").logits(ids),
                                   atol=1e-6, rtol=0)
    finally:
        remote.model.experts.close()


@pytest.fixture(scope="module")
def q8_dense(qwen3_dir, tmp_path_factory):
    """Q4 experts, and the attention projections and unembedding stored in 8 bits."""
    return convert(qwen3_dir, tmp_path_factory.mktemp("qwen3-q4-q8") / "out", "q4", max_shard_bytes=8_000_000,
                   progress=False, dense="q8")


def test_dense_q8_stores_the_attention_and_the_unembedding_in_8_bits(qwen3_dir, q8_dense):
    src, out = Checkpoint(qwen3_dir), Checkpoint(q8_dense)
    assert out.config["quantization_config"]["dense"] == "q8"
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.o_proj.weight", "lm_head.weight"):
        values, scales = Q8.quantize(bf16_to_f32(src.tensor(name)))
        assert out.info(name) == (src.info(name)[0], "I8")
        np.testing.assert_array_equal(out.tensor(name), values.reshape(out.tensor(name).shape))
        np.testing.assert_array_equal(out.tensor(name + "_scale").view(np.uint16), scales)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.q_norm.weight"):
        np.testing.assert_array_equal(out.tensor(name), src.tensor(name))


def test_a_q8_dense_checkpoint_runs_on_its_8_bit_matrices(qwen3_dir, q8_dense, tmp_path):
    """Exact precision reads the stored values as they are, fast puts them in the kernels' order once:
    both match the reference on the same weights, and fast gives the very logits of the 8-bit copy
    made at load from the bf16 matrices (`--dense q8`): the stored bytes are that copy's."""
    from coordinator.engine import Q8DenseLinear

    ids = np.random.default_rng(4).integers(0, 151_643, 40)
    ref = Engine.load(q8_dense, precision="reference").logits(ids)
    assert np.abs(Engine.load(q8_dense, precision="exact").logits(ids) - ref).max() <= 1e-3
    fast = Engine.load(q8_dense, precision="fast")
    assert isinstance(fast.model.linear, Q8DenseLinear)
    got = fast.logits(ids)
    assert np.abs(got - ref).max() <= 2e-2
    bf16_dense = convert(qwen3_dir, tmp_path / "q4", "q4", progress=False)
    np.testing.assert_array_equal(Engine.load(bf16_dense, precision="fast", dense="q8").logits(ids), got)
    stored = sum(a.nbytes for a in Engine.load(q8_dense, precision="exact").weight_arrays())
    assert stored < sum(a.nbytes for a in Engine.load(bf16_dense, precision="exact").weight_arrays())


def test_cli_converts_reports_the_cost_and_refuses_what_it_cannot(qwen3_dir, tiny_dir, tmp_path):
    run = lambda *a: subprocess.run(MOEMESH + ["convert", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, cwd=TESTS)
    done = run("-m", qwen3_dir, "-o", tmp_path / "q", "--eval-prompts", "1", "--experts", "q4", "--dense", "q8")
    assert done.returncode == 0, done.stderr
    assert Checkpoint(tmp_path / "q").config["quantization_config"] == {
        "quant_method": "moemesh", "experts": "q4", "source_experts": "bf16", "dense": "q8"}
    cost = json.loads(done.stdout.splitlines()[-1])
    assert cost["positions"] == 32 and 0 < cost["mean_kl"] and 0 <= cost["top1_agreement"] <= 1
    assert "mean KL" in done.stderr
    again = run("-m", qwen3_dir, "-o", tmp_path / "q", "--no-eval")
    assert again.returncode != 0 and "holds a checkpoint already" in again.stderr and "Traceback" not in again.stderr
    gpt = run("-m", tiny_dir, "-o", tmp_path / "g", "--no-eval")
    assert gpt.returncode != 0 and "mxfp4 already" in gpt.stderr and "Traceback" not in gpt.stderr


def test_a_converted_checkpoint_with_an_unknown_format_is_refused(converted, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["experts"] = "q3_k"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config"):
        Engine.load(bad)


def test_a_nan_in_a_source_expert_is_named(qwen3_dir, tmp_path):
    import shutil
    import struct

    src = tmp_path / "src"
    shutil.copytree(qwen3_dir, src)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    path = Checkpoint(src).where(name)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start = json.loads(f.read(n))[name]["data_offsets"][0]
        f.seek(8 + n + start + 2 * 7)
        f.write(struct.pack("<H", 0x7FC0))  # bf16 NaN
    with pytest.raises(CheckpointError, match=f"{name}: w: contains NaN or Inf"):
        convert(src, tmp_path / "out", progress=False)
