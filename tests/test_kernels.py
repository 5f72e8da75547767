"""Native kernels against the numpy reference on every ISA path this CPU has, plus the
determinism and boundary-safety guarantees the cluster relies on.

Tolerances (relative to the largest reference output magnitude):
- exact (fp32 activations): 2e-5 — only the summation order differs from numpy;
- fast (int16 activation blocks): 2e-4 — activations carry 15 bits per 32-block.
"""
import dataclasses

import numpy as np
import pytest

from coordinator.models.layers import reference_linear
from expert_node import native
from expert_node.checkpoint import f32_to_bf16
from expert_node.experts import EXPERT_FORMATS, ExpertShape, LayerExperts, ReferenceExpertBackend

ISAS = native.available_isas()
TOL = {"exact": 2e-5, "fast": 2e-4}


def random_experts(rng, E=5, H=640, I=544, scale_lo=118, scale_hi=124):
    scales = lambda *s: rng.integers(scale_lo, scale_hi, s, dtype=np.uint8)  # noqa: E731
    bias = lambda *s: f32_to_bf16(rng.standard_normal(s).astype(np.float32) * 0.3)  # noqa: E731
    w = LayerExperts(rng.integers(0, 256, (E, 2 * I, H // 32, 16), dtype=np.uint8), scales(E, 2 * I, H // 32),
                     bias(E, 2 * I), rng.integers(0, 256, (E, H, I // 32, 16), dtype=np.uint8),
                     scales(E, H, I // 32), bias(E, H))
    return w, ExpertShape(E, H, I, 7.0)


def run_native(w, shape, x, ids, precision, isa):
    out = np.empty(ids.shape + (x.shape[1],), np.float32)
    native.moe_experts(x, ids, w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks,
                       w.down_scales, w.down_bias, out, precision=precision, isa=isa, activation=shape.activation)
    return out


def assert_close(got, ref, tol):
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("activation", ["swiglu_clamped", "swiglu"])
def test_moe_experts_match_reference(isa, precision, T, activation):
    """gpt-oss's clamped SwiGLU, and the plain one of converted Qwen3-MoE experts."""
    rng = np.random.default_rng(T)
    w, shape = random_experts(rng)
    shape = dataclasses.replace(shape, activation=activation)
    x = rng.standard_normal((T, shape.hidden)).astype(np.float32)
    ids = np.stack([rng.choice([0, 2, 3], 2, replace=False) for _ in range(T)]).astype(np.int32)  # 1, 4 unused
    ref = ReferenceExpertBackend({0: w}, shape).run(0, x, ids)
    assert_close(run_native(w, shape, x, ids, precision, isa), ref, TOL[precision])


def random_quantized_experts(rng, fmt, E=5, H=640, I=544):
    """Q4 or Q8 experts with random codes and fp16 scales sized for unit-scale outputs (no biases)."""
    cls = EXPERT_FORMATS[fmt]
    q = cls.QUANT
    scales = lambda *s: np.exp2(rng.uniform(-7, -4, s) - (4 if fmt == "q8" else 0)).astype(np.float16).view(np.uint16)  # noqa: E731
    values = lambda *s: rng.integers(-127, 128, (*s, 32), dtype=np.int8) if fmt == "q8" else \
        rng.integers(0, 256, (*s, 16), dtype=np.uint8)  # noqa: E731
    w = cls(values(E, 2 * I, H // 32), scales(E, 2 * I, H // 32), np.zeros((E, 2 * I), np.uint16),
            values(E, H, I // 32), scales(E, H, I // 32), np.zeros((E, H), np.uint16))
    assert w.gate_up_blocks.shape[-1] == q.block_bytes
    return w, ExpertShape(E, H, I, 7.0, format=fmt, activation="swiglu")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_quantized_experts_match_reference(isa, precision, T, fmt):
    """Q4 and Q8 experts (what `moemesh convert` writes for bf16-trained models) on every path:
    Q8's fast kernels read values put in their own order first (weight_layout), exact ones as stored."""
    rng = np.random.default_rng(T)
    w, shape = random_quantized_experts(rng, fmt)
    x = rng.standard_normal((T, shape.hidden)).astype(np.float32)
    ids = np.stack([rng.choice([0, 2, 3], 2, replace=False) for _ in range(T)]).astype(np.int32)
    ref = ReferenceExpertBackend({0: w}, shape).run(0, x, ids)
    gate_up, down, layout = w.gate_up_blocks, w.down_blocks, "natural"
    if precision == "fast":
        gate_up, down = gate_up.copy(), down.copy()
        layout = native.weight_layout(fmt, gate_up, isa=isa)
        assert native.weight_layout(fmt, down, isa=isa) == layout
    out = np.empty(ids.shape + (x.shape[1],), np.float32)
    native.moe_experts(x, ids, gate_up, w.gate_up_scales, None, down, w.down_scales, None, out,
                       precision=precision, activation="swiglu", format=fmt, layout=layout, isa=isa)
    assert_close(out, ref, TOL[precision])


def test_quantized_experts_refuse_values_in_another_layout():
    rng = np.random.default_rng(0)
    w, shape = random_quantized_experts(rng, "q8", E=2, H=64, I=64)
    x = np.ones((1, 64), np.float32)
    out = np.empty((1, 1, 64), np.float32)
    args = (x, np.zeros((1, 1), np.int32), w.gate_up_blocks, w.gate_up_scales, None, w.down_blocks, w.down_scales,
            None, out)
    if native.weight_layout("q8", w.gate_up_blocks.copy()) != "natural":
        with pytest.raises(ValueError, match="layout: the values are in layout 'natural'"):
            native.moe_experts(*args, precision="fast", activation="swiglu", format="q8")
    with pytest.raises(ValueError, match="gate_up_blocks: expected dtype int8"):
        native.moe_experts(x, np.zeros((1, 1), np.int32), w.gate_up_blocks.view(np.uint8), *args[3:],
                           activation="swiglu", format="q8")
    with pytest.raises(ValueError, match="gate_up_scales: expected dtype uint16"):
        native.moe_experts(x, np.zeros((1, 1), np.int32), w.gate_up_blocks, w.gate_up_scales.view(np.uint8)[..., ::2].copy(),
                           *args[4:], activation="swiglu", format="q8")
    with pytest.raises(ValueError, match="format: 'q5' is not one of mxfp4, q4, q8"):
        native.moe_experts(*args, activation="swiglu", format="q5")


@pytest.mark.parametrize("isa", ISAS)
def test_largest_scale_bytes(isa):
    """Scales near the top of the E8M0 range (2^100) stay finite and exact in fp32."""
    rng = np.random.default_rng(9)
    w, shape = random_experts(rng, scale_lo=226, scale_hi=228)
    x = rng.standard_normal((3, shape.hidden)).astype(np.float32) * 1e-30
    ids = np.array([[0, 1], [2, 3], [4, 0]], np.int32)
    ref = ReferenceExpertBackend({0: w}, shape).run(0, x, ids)
    assert np.isfinite(ref).all()
    assert_close(run_native(w, shape, x, ids, "exact", isa), ref, TOL["exact"])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T,K,N", [(1, 2880 // 20, 67), (5, 100, 33), (4, 64, 1), (40, 320, 130)])
def test_bf16_matmul_matches_reference(isa, T, K, N):
    rng = np.random.default_rng(K)
    w = f32_to_bf16(rng.standard_normal((N, K)).astype(np.float32))
    b = f32_to_bf16(rng.standard_normal(N).astype(np.float32))
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.empty((T, N), np.float32)
    native.bf16_matmul(x, w, b, out, isa=isa)
    assert_close(out, reference_linear(x, w, (b.astype(np.uint32) << 16).view(np.float32)), TOL["exact"])


def test_inputs_are_checked_finite_naming_the_first_bad_index():
    """NaN and both infinities are refused with the flat index of the first one; the largest finite
    float, denormals and negative zero pass."""
    w = np.full((8, 64), 0x3F80, np.uint16)  # bf16 ones
    out = np.empty((3, 8), np.float32)
    x = np.zeros((3, 64), np.float32)
    x[0, :4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -0.0]
    native.bf16_matmul(x, w, None, out)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 9] = bad
        y[2, 40] = np.nan
        with pytest.raises(ValueError, match="x: contains NaN or Inf at flat index 137$"):
            native.bf16_matmul(y, w, None, out)


def test_bf16_experts_give_a_token_the_same_bits_whatever_shares_its_step():
    """Unconverted bf16 experts (Qwen3's hub layout) run on the bf16 matmul: 40 rows routed to one
    expert in a step (a batch of sequences with drafts) must give each token what it gets alone,
    which the matrix tiles' rounding would not."""
    rng = np.random.default_rng(8)
    E, H, I = 2, 128, 64
    bf16 = lambda *s: f32_to_bf16((rng.standard_normal(s) * 0.2).astype(np.float32))  # noqa: E731
    w = EXPERT_FORMATS["bf16"](bf16(E, I, H), bf16(E, I, H), bf16(E, H, I))
    shape = ExpertShape(E, H, I, float("inf"), top_k=1, format="bf16", activation="swiglu")
    x = rng.standard_normal((40, H)).astype(np.float32)
    ids = np.zeros((40, 1), np.int32)
    together = w.run_native(native, shape, x, ids, "exact")
    alone = np.concatenate([w.run_native(native, shape, x[t:t + 1], ids[t:t + 1], "exact") for t in range(40)])
    np.testing.assert_array_equal(together, alone)
    assert_close(together, ReferenceExpertBackend({0: w}, shape).run(0, x, ids), TOL["exact"])


def test_results_are_bit_identical_across_threads_and_request_splits():
    rng = np.random.default_rng(4)
    w, shape = random_experts(rng, E=6, H=128, I=96)
    # 40 tokens: ~20 per expert, so a matrix-unit path (AMX) takes groups of them where the
    # 4-token requests below take the vector kernels.
    x = rng.standard_normal((40, shape.hidden)).astype(np.float32)
    ids = np.stack([rng.choice(6, 3, replace=False) for _ in range(40)]).astype(np.int32)
    try:
        for precision in ("exact", "fast"):
            native.set_threads(1)
            one = run_native(w, shape, x, ids, precision, None)
            native.set_threads(2)
            two = run_native(w, shape, x, ids, precision, None)
            np.testing.assert_array_equal(one, two)
            # split tokens into two requests
            parts = np.concatenate([run_native(w, shape, x[:4], ids[:4], precision, None),
                                    run_native(w, shape, x[4:], ids[4:], precision, None)])
            np.testing.assert_array_equal(parts, one)
            # split experts over two "nodes": each computes its own, -1 elsewhere
            mine = np.where(ids < 3, ids, -1).astype(np.int32)
            theirs = np.where(ids >= 3, ids, -1).astype(np.int32)
            a, b = run_native(w, shape, x, mine, precision, None), run_native(w, shape, x, theirs, precision, None)
            np.testing.assert_array_equal(np.where((ids < 3)[..., None], a, b), one)
    finally:
        native.set_threads(0)


def q8_reference(w_bf16, x):
    """x @ W^T over the Q8 copy's values, from the natural-layout (scalar) copy, in float64."""
    values, scales, layout = native.q8_quantize(w_bf16, isa="scalar")
    assert layout == "natural"
    d = scales.view(np.float16).astype(np.float64).repeat(32, axis=1)
    return x.astype(np.float64) @ (values * d).T, values, d


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T,K,N", [(1, 2880, 70), (9, 320, 33), (3, 128, 1), (40, 608, 300)])
def test_q8_copy_and_matmul(isa, T, K, N):
    rng = np.random.default_rng(K + T)
    w = f32_to_bf16(rng.standard_normal((N, K)).astype(np.float32) * 0.02)
    x = rng.standard_normal((T, K)).astype(np.float32)
    ref, values, d = q8_reference(w, x)
    wf = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert np.abs(values).max() <= 127
    assert (np.abs(values * d - wf) <= 0.6 * d).all()  # nearest step (+ the fp16 rounding of the scale)
    copy = native.q8_quantize(w, isa=isa)
    out = np.empty((T, N), np.float32)
    native.q8_matmul(x, *copy, out, isa=isa)
    assert_close(out, ref, TOL["fast"])  # the only difference left: int16 activation blocks
    # exact: fp32 activations over the values as stored (a checkpoint's `convert --dense q8` matrices)
    natural = np.ascontiguousarray(values)
    native.q8_matmul(x, natural, copy[1], "natural", out, precision="exact", isa=isa)
    assert_close(out, ref, TOL["exact"])


def test_q8_matmul_is_bit_identical_across_token_splits():
    """40 tokens at once (matrix-unit groups where the CPU has AMX) equal 4-token requests."""
    rng = np.random.default_rng(8)
    w = f32_to_bf16(rng.standard_normal((300, 608)).astype(np.float32) * 0.02)
    x = rng.standard_normal((40, 608)).astype(np.float32)
    copy = native.q8_quantize(w)
    whole, parts = np.empty((40, 300), np.float32), np.empty((40, 300), np.float32)
    native.q8_matmul(x, *copy, whole)
    for t in range(0, 40, 4):
        native.q8_matmul(x[t:t + 4], *copy, parts[t:t + 4])
    np.testing.assert_array_equal(whole, parts)


def test_q8_copy_refuses_a_foreign_layout_and_bad_shapes():
    w = np.zeros((4, 128), np.uint16)
    copy = native.q8_quantize(w)
    out = np.empty((1, 4), np.float32)
    with pytest.raises(ValueError, match="K = 100 is not a multiple of 32"):
        native.q8_quantize(np.zeros((4, 100), np.uint16))
    with pytest.raises(ValueError, match="scales: expected shape"):
        native.q8_matmul(np.zeros((1, 128), np.float32), copy[0], copy[1][:, :2].copy(), copy[2], out)
    if copy[2] != "natural":
        with pytest.raises(ValueError, match="layout: the copy was made in layout"):
            native.q8_matmul(np.zeros((1, 128), np.float32), *copy, out, isa="scalar")
        with pytest.raises(ValueError, match="kernels read 'natural' at exact precision"):
            native.q8_matmul(np.zeros((1, 128), np.float32), *copy, out, precision="exact")


def kl_against_exact(tiny_dir, **fast_options):
    """Mean KL of next-token distributions against exact, and top-1 agreement, on tiny prompts."""
    from coordinator import Engine

    exact, fast = Engine.load(tiny_dir, precision="exact"), Engine.load(tiny_dir, precision="fast", **fast_options)
    kls, agree = [], []
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, 199_998, 48)
        a, b = exact.logits(ids).astype(np.float64), fast.logits(ids).astype(np.float64)
        la = a - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)) - a.max(1, keepdims=True)
        lb = b - np.log(np.exp(b - b.max(1, keepdims=True)).sum(1, keepdims=True)) - b.max(1, keepdims=True)
        kls += list((np.exp(la) * (la - lb)).sum(1))
        agree += list(a.argmax(1) == b.argmax(1))
    return float(np.mean(kls)), float(np.mean(agree))


def test_fast_backend_is_close_to_exact_end_to_end(tiny_dir):
    kl, agree = kl_against_exact(tiny_dir)
    print(f"fast vs exact: mean KL {kl:.3e} nats, top-1 agreement {agree:.1%}")
    assert kl <= 2e-3 and agree >= 0.98


def test_cost_of_the_8_bit_dense_copy(tiny_dir):
    """The optional Q8 copy of attention and unembedding (--dense q8): its accuracy cost, reported
    (1.6e-2 nats, 93% top-1 on this random model whose q/k/v rows are two blocks long; the
    full-size figures come from bench/accuracy.py). The bound catches a broken copy: a wrong
    layout or scale gives KL of whole nats."""
    kl, agree = kl_against_exact(tiny_dir, dense="q8")
    print(f"fast + q8 dense vs exact: mean KL {kl:.3e} nats, top-1 agreement {agree:.1%}")
    assert kl <= 0.1 and agree >= 0.8


def test_q8_dense_needs_the_fast_precision(tiny_dir):
    from coordinator import Engine

    with pytest.raises(ValueError, match="fast precision only"):
        Engine.load(tiny_dir, precision="exact", dense="q8")


# ---- boundary safety: every bad call is a ValueError naming the argument -----------------------

@pytest.fixture
def good():
    rng = np.random.default_rng(0)
    w, shape = random_experts(rng)
    x = rng.standard_normal((2, shape.hidden)).astype(np.float32)
    ids = np.array([[0, 1], [2, 3]], np.int32)
    return w, x, ids


def call(w, x_, ids_, out=None, **kw):
    out = np.empty(ids_.shape + (x_.shape[1],), np.float32) if out is None else out
    args = dict(x=x_, expert_ids=ids_, gate_up_blocks=w.gate_up_blocks, gate_up_scales=w.gate_up_scales,
                gate_up_bias=w.gate_up_bias, down_blocks=w.down_blocks, down_scales=w.down_scales,
                down_bias=w.down_bias, out=out)
    args.update(kw)
    native.moe_experts(**args)


@pytest.mark.parametrize("mutate,match", [
    (lambda w, x, ids: dict(expert_ids=np.array([[0, 5], [1, 2]], np.int32)), "expert_ids: id 5"),
    (lambda w, x, ids: dict(expert_ids=np.array([[0, -2], [1, 2]], np.int32)), "expert_ids: id -2"),
    (lambda w, x, ids: dict(expert_ids=ids.astype(np.int64)), "expert_ids: expected dtype int32"),
    (lambda w, x, ids: dict(x=x[:, :64].copy()), "gate_up_blocks: expected shape"),
    (lambda w, x, ids: dict(x=x.astype(np.float64)), "x: expected dtype float32"),
    (lambda w, x, ids: dict(x=np.asfortranarray(np.tile(x, (2, 1)))[::2]), "x: must be C-contiguous"),
    (lambda w, x, ids: dict(x=np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x).astype(np.float32)), "x: contains NaN or Inf"),
    (lambda w, x, ids: dict(x=np.full_like(x, np.inf)), "x: contains NaN or Inf"),
    (lambda w, x, ids: dict(down_scales=w.down_scales[:, :-1].copy()), "down_scales: expected shape"),
    (lambda w, x, ids: dict(gate_up_blocks=w.gate_up_blocks[:4].copy()), "gate_up_scales: expected shape"),
    (lambda w, x, ids: dict(down_bias=w.down_bias.astype(np.float32)), "down_bias: expected dtype uint16"),
    (lambda w, x, ids: dict(activation="gelu"), "activation: 'gelu' is not one of swiglu_clamped, swiglu"),
    (lambda w, x, ids: dict(out=np.empty((2, 2, 639), np.float32)), "out: expected shape"),
    (lambda w, x, ids: dict(out=np.empty((2, 2, 640), np.float32)[...].view()), None),
    (lambda w, x, ids: dict(precision="int3"), "precision: expected 'exact' or 'fast'"),
    (lambda w, x, ids: dict(isa="sse9"), "isa: unknown ISA 'sse9'"),
])
def test_bad_calls_raise_value_error(good, mutate, match):
    w, x, ids = good
    kwargs = mutate(w, x, ids)
    if match is None:  # a control: the well-formed variant is accepted
        call(w, x, ids, **kwargs)
        return
    out = kwargs.pop("out", None)
    with pytest.raises(ValueError, match=match):
        call(w, x, ids, out=out, **kwargs)


def test_read_only_and_aliased_outputs_are_refused(good):
    w, x, ids = good
    out = np.empty((2, 2, 640), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: must be writeable"):
        call(w, x, ids, out=out)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        native.bf16_matmul(x, np.zeros((640, 640), np.uint16), None, x)
    with pytest.raises(ValueError, match="bias: expected shape"):
        native.bf16_matmul(x, np.zeros((5, 640), np.uint16), np.zeros(4, np.uint16), np.empty((2, 5), np.float32))


@pytest.mark.parametrize("window", [None, 5])
def test_attention_softmax_matches_the_reference(window):
    """The engine's native softmax against softmax_with_sinks: causal and sliding masks, keys in
    ring order (a sliding layer's cache), sinks large and small, rows whose keys are all masked
    but one."""
    from coordinator.engine import native_softmax
    from coordinator.models.layers import softmax_with_sinks

    rng = np.random.default_rng(3)
    H, T, S, d = 6, 9, 37, 64
    scores = (rng.standard_normal((H, T, S)) * 40).astype(np.float32)
    sinks = np.array([-1e9, -3, 0, 2, 8, 30], np.float32)
    k_pos = rng.permutation(S).astype(np.int64)
    q_pos = np.arange(S - T, S, dtype=np.int64)
    q_pos[0] = k_pos.min()  # sees a single key
    ref = softmax_with_sinks(scores, sinks, q_pos, k_pos, window, d)
    got = native_softmax(scores.copy(), sinks, q_pos, k_pos, window, d)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    assert (got[:, :, k_pos > q_pos[-1]] == 0).all()


@pytest.mark.parametrize("T", [1, 7, 40])
def test_rmsnorm_matches_the_reference(T):
    """The engine's native rmsnorm against the numpy spec: one row (decode), odd and many rows,
    magnitudes from tiny to large, a zero row (eps keeps it finite)."""
    from coordinator.engine import native_rmsnorm
    from coordinator.models.layers import rmsnorm

    rng = np.random.default_rng(T)
    H = 2880
    x = (rng.standard_normal((T, H)) * np.logspace(-3, 3, T)[:, None]).astype(np.float32)
    x[T // 2] = 0
    w = rng.standard_normal(H).astype(np.float32)
    np.testing.assert_allclose(native_rmsnorm(x, w, 1e-5), rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1, 5])
def test_rope_rotation_matches_the_reference_bit_for_bit(T):
    from coordinator.engine import native_rotate
    from coordinator.models.layers import rope_tables, rotate_half_split

    rng = np.random.default_rng(T)
    x = (rng.standard_normal((T, 6, 64)) * 30).astype(np.float32)
    cos, sin = rope_tables(np.arange(1000, 1000 + T), rng.random(32).astype(np.float32), 1.35)
    np.testing.assert_array_equal(native_rotate(x.copy(), cos, sin), rotate_half_split(x, cos, sin))


def test_rope_rotate_refuses_bad_arguments():
    good = dict(x=np.zeros((2, 3, 8), np.float32), cos=np.zeros((2, 4), np.float32), sin=np.zeros((2, 4), np.float32))
    for name, bad, match in [("x", np.zeros((2, 3, 7), np.float32), "x: expected shape"),
                             ("cos", np.zeros((2, 3), np.float32), "cos: expected shape"),
                             ("sin", np.zeros((2, 4), np.float64), "sin: expected dtype")]:
        with pytest.raises(ValueError, match=match):
            native.rope_rotate(**{**good, name: bad})


def test_router_and_expert_sum_match_the_reference():
    """The engine's native router (ties go to the lower id, softmax over the top k) and the
    residual add of the weighted expert outputs (the same float operations: the same bits)."""
    from coordinator.engine import native_add_experts, native_topk
    from coordinator.models.layers import add_experts, router_topk

    rng = np.random.default_rng(11)
    logits = rng.standard_normal((9, 32)).astype(np.float32)
    logits[0, [3, 17, 30]] = 4.0  # a three-way tie at the top
    ids, weights = native_topk(logits, 4)
    ref_ids, ref_weights = router_topk(logits, 4)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    outputs = rng.standard_normal((9, 4, 64)).astype(np.float32)
    np.testing.assert_array_equal(native_add_experts(x, outputs, weights), add_experts(x, outputs, weights))
    # A prefill's tokens in several tasks on the pool, 8 experts, a width no vector length divides.
    x = rng.standard_normal((53, 70)).astype(np.float32)
    outputs = rng.standard_normal((53, 8, 70)).astype(np.float32)
    weights = rng.random((53, 8)).astype(np.float32)
    np.testing.assert_array_equal(native_add_experts(x, outputs, weights), add_experts(x, outputs, weights))


def test_router_and_expert_sum_refuse_bad_arguments():
    with pytest.raises(ValueError, match="logits: contains NaN"):
        native.router_topk(np.array([[0, np.nan, 1]], np.float32), 2)
    with pytest.raises(ValueError, match="k: must be in"):
        native.router_topk(np.zeros((1, 3), np.float32), 4)
    with pytest.raises(ValueError, match="weights: expected shape"):
        native.add_experts(np.zeros((2, 8), np.float32), np.zeros((2, 4, 8), np.float32), np.zeros((2, 3), np.float32),
                           np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="at least one expert"):
        native.add_experts(np.zeros((2, 8), np.float32), np.zeros((2, 0, 8), np.float32), np.zeros((2, 0), np.float32),
                           np.zeros((2, 8), np.float32))
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        native.add_experts(x, np.zeros((2, 4, 8), np.float32), np.zeros((2, 4), np.float32), x)


def test_rmsnorm_refuses_bad_arguments():
    good = dict(x=np.zeros((2, 8), np.float32), w=np.zeros(8, np.float32), eps=1e-5, out=np.zeros((2, 8), np.float32))
    for name, bad, match in [("x", np.zeros(8, np.float32), "x: expected shape"),
                             ("w", np.zeros(7, np.float32), "w: expected shape"),
                             ("out", np.zeros((2, 8), np.float64), "out: expected dtype"),
                             ("eps", float("nan"), "eps")]:
        with pytest.raises(ValueError, match=match):
            native.rmsnorm(**{**good, name: bad})
    with pytest.raises(ValueError, match="out: must not overlap x"):
        native.rmsnorm(**{**good, "out": good["x"]})


@pytest.mark.parametrize("T, S, window, ring", [(1, 1, None, False), (1, 37, None, False), (1, 300, None, False),
                                                 (1, 16, 16, True), (1, 16, 8, True), (7, 40, None, False),
                                                 (7, 40, 5, False), (16, 16, 16, False)])
def test_native_attention_matches_the_reference(T, S, window, ring):
    """The engine's native attention against attention_with_sinks: a decoded token over a full
    layer's keys in order and over a sliding layer's ring (keys in slot order, some outside a
    narrower window); prompt chunks of queries, causal and windowed; grouped query heads, sinks
    large and small."""
    from coordinator.engine import native_attend
    from coordinator.models.layers import attention_with_sinks

    rng = np.random.default_rng(S + T)
    nq, nkv, d = 8, 2, 64
    q = (rng.standard_normal((T, nq, d)) * 3).astype(np.float32)
    k, v = (rng.standard_normal((S, nkv, d)).astype(np.float32) for _ in range(2))
    sinks = np.array([-1e9, -3, 0, 2, 8, 30, 1, -1], np.float32)
    k_pos = np.arange(100, 100 + S, dtype=np.int64)
    if ring:
        k_pos = np.roll(k_pos, 5)
    q_pos = np.arange(k_pos.max() - T + 1, k_pos.max() + 1, dtype=np.int64)
    ref = attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window)
    np.testing.assert_allclose(native_attend(q, k, v, sinks, q_pos, k_pos, window), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S, window", [(1, 0), (37, 0), (300, 100)])
def test_attention_kernels_give_the_same_bits_on_every_isa(S, window):
    """The vector softmax and attention redo attention.h's float operations in its order: every ISA
    path returns the portable code's bits (keys in ring order, a window, 8-head groups, 5 queries)."""
    rng = np.random.default_rng(S)
    q = (rng.standard_normal((5, 16, 64)) * 3).astype(np.float32)
    k, v = (rng.standard_normal((S, 2, 64)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(16).astype(np.float32)
    k_pos = np.roll(np.arange(S, dtype=np.int64), 3)
    scores = (rng.standard_normal((16, 5, S)) * 30).astype(np.float32)
    q_pos = np.arange(S - 5, S, dtype=np.int64)
    decoded, weights = {}, {}
    for isa in native.available_isas():
        decoded[isa] = np.empty((5, 16, 64), np.float32)
        native.attend(q, k, v, sinks, q_pos, k_pos, window, 8.0, decoded[isa], isa=isa)
        weights[isa] = scores.copy()
        native.attention_softmax(weights[isa], sinks, q_pos, k_pos, window, 8.0, isa=isa)
    for isa in decoded:
        np.testing.assert_array_equal(decoded[isa], decoded["scalar"], err_msg=isa)
        np.testing.assert_array_equal(weights[isa], weights["scalar"], err_msg=isa)


def test_native_attention_refuses_bad_arguments():
    good = dict(q=np.zeros((1, 4, 64), np.float32), k=np.zeros((3, 2, 64), np.float32),
                v=np.zeros((3, 2, 64), np.float32), sinks=np.zeros(4, np.float32), q_pos=np.array([2]),
                k_pos=np.arange(3, dtype=np.int64), window=0, sqrt_d=8.0, out=np.zeros((1, 4, 64), np.float32))
    native.attend(**good)
    for name, bad, match in [("k", np.zeros((3, 3, 64), np.float32), "kv heads must divide"),
                             ("v", np.zeros((3, 2, 4), np.float32), "v: expected shape"),
                             ("k_pos", np.arange(2, dtype=np.int64), "k_pos: expected shape"),
                             ("out", np.zeros((1, 4, 64), np.float64), "out: expected dtype"),
                             ("q_pos", np.array([2], np.int32), "q_pos: expected dtype"),
                             ("sqrt_d", -1.0, "sqrt_d"),
                             ("q", np.zeros((1, 4, 6), np.float32), "head dimension must be a multiple of 16"),
                             ("sinks", np.array([0, 0, np.inf, 0], np.float32), "sinks: contains")]:
        with pytest.raises(ValueError, match=match):
            native.attend(**{**good, name: bad})
    with pytest.raises(ValueError, match="out: must not overlap q"):
        native.attend(**{**good, "out": good["q"]})


def test_attention_softmax_refuses_bad_arguments():
    good = dict(scores=np.zeros((2, 3, 4), np.float32), sinks=np.zeros(2, np.float32),
                q_pos=np.arange(3, dtype=np.int64), k_pos=np.arange(4, dtype=np.int64), window=0, sqrt_d=8.0)
    for name, bad, match in [("scores", np.zeros((2, 3), np.float32), "scores: expected shape"),
                             ("sinks", np.zeros(3, np.float32), "sinks: expected shape"),
                             ("k_pos", np.arange(4, dtype=np.int32), "k_pos: expected dtype"),
                             ("sqrt_d", 0.0, "sqrt_d"),
                             ("sinks", np.array([0, np.nan], np.float32), "sinks: contains NaN")]:
        with pytest.raises(ValueError, match=match):
            native.attention_softmax(**{**good, name: bad})
