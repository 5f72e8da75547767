"""The numpy reference model against the spec's constants and its own invariants."""
import numpy as np
import pytest

from coordinator import Engine, synth
from coordinator.models.gpt_oss import GptOssConfig
from coordinator.models.layers import (attention_with_sinks, combine_experts, rope_tables, rope_yarn,
                                       rotate_half_split, router_topk)
from expert_node.reference import split_gate_up, swiglu_clamped


def config_20b() -> GptOssConfig:
    return GptOssConfig.from_dict(synth.make_config("gpt-oss-20b"))


def test_yarn_frequencies_match_the_spec():
    inv, c = rope_yarn(config_20b())
    assert c == pytest.approx(1.3465735902799727, rel=1e-12)
    expected = {0: 1.0, 1: 0.6890442967, 8: 0.05081328005, 9: 0.03170569614, 12: 0.006794959307,
                17: 1.293186942e-4, 18: 3.830881178e-5, 31: 3.023511397e-7}
    for i, v in expected.items():
        assert inv[i] == pytest.approx(v, rel=2e-6), i


def test_truncate_true_would_change_the_blend():
    cfg = synth.make_config("gpt-oss-20b")
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], truncate=True)
    truncated, _ = rope_yarn(GptOssConfig.from_dict(cfg))
    honoured, _ = rope_yarn(config_20b())
    assert not np.allclose(truncated[9:18], honoured[9:18])


def test_rope_pairs_i_with_i_plus_half_and_scales_by_c():
    x = np.zeros((1, 1, 8), np.float32)
    x[0, 0, 0] = 1.0
    inv = np.array([np.pi / 2, 0, 0, 0], np.float32)
    out = rotate_half_split(x, *rope_tables(np.array([1]), inv, 2.0))
    np.testing.assert_allclose(out[0, 0], [0, 0, 0, 0, 2.0, 0, 0, 0], atol=1e-6)


def test_sink_takes_probability_mass_and_window_limits_keys():
    rng = np.random.default_rng(0)
    T, nq, nkv, d = 6, 4, 2, 8
    q = rng.standard_normal((T, nq, d)).astype(np.float32)
    k = rng.standard_normal((T, nkv, d)).astype(np.float32)
    v = np.ones((T, nkv, d), np.float32)  # output = total attention weight on keys
    pos = np.arange(T)
    no_sink = attention_with_sinks(q, k, v, np.full(nq, -1e9, np.float32), pos, pos, None)
    np.testing.assert_allclose(no_sink, 1.0, rtol=1e-6)
    with_sink = attention_with_sinks(q, k, v, np.full(nq, 2.0, np.float32), pos, pos, None)
    assert (with_sink < 1.0).all() and (with_sink > 0).all()
    # A window of 2 keeps keys t-1 and t: changing key 0 must not affect query 3 onwards.
    k2 = k.copy()
    k2[0] += 5
    a = attention_with_sinks(q, k, rng.standard_normal(v.shape).astype(np.float32), np.zeros(nq, np.float32), pos, pos, 2)
    b = attention_with_sinks(q, k2, rng.standard_normal(v.shape).astype(np.float32), np.zeros(nq, np.float32), pos, pos, 2)
    assert not np.allclose(a[0], b[0])


def test_window_counts_the_current_token():
    T, d = 5, 2
    q = np.zeros((T, 1, d), np.float32)
    k = np.zeros((T, 1, d), np.float32)
    v = np.arange(T, dtype=np.float32)[:, None, None].repeat(d, axis=2)
    pos = np.arange(T)
    out = attention_with_sinks(q, k, v, np.array([-1e9], np.float32), pos, pos, 3)
    # uniform over keys t-2..t: the mean of those positions
    np.testing.assert_allclose(out[:, 0], [0, 0.5, 1, 2, 3], atol=1e-6)


def test_router_softmax_over_the_topk_only_and_ties_go_to_lower_ids():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 2.0]], np.float32)
    idx, w = router_topk(logits, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 4]])
    e = np.exp([3.0, 3.0, 2.0])
    np.testing.assert_allclose(w[0], e / e.sum(), rtol=1e-6)


def test_swiglu_clamps_gate_above_only_and_adds_one_to_up():
    h = np.array([10.0, 10.0, -10.0, -10.0], np.float32)  # (gate, up) pairs
    out = swiglu_clamped(*split_gate_up(h))
    sig = lambda g: 1 / (1 + np.exp(-1.702 * g))  # noqa: E731
    np.testing.assert_allclose(out, [7 * sig(7) * 8, -10 * sig(-10) * -6], rtol=1e-6)


def test_combine_weights_every_slot():
    outs = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    w = np.array([[0.5, 0.25, 0.25]], np.float32)
    expected = outs[0, 0] * 0.5 + outs[0, 1] * 0.25 + outs[0, 2] * 0.25
    np.testing.assert_array_equal(combine_experts(outs, w)[0], expected)


@pytest.mark.parametrize("precision", ["reference", "exact"])
def test_incremental_decoding_equals_full_recompute(tiny_dir, precision):
    engine = Engine.load(tiny_dir, precision=precision)
    ids = np.random.default_rng(3).integers(0, 199_998, 30)
    full = engine.logits(ids)
    cache = engine.model.new_cache()
    steps = [engine.model.forward(ids[:20], cache, all_logits=True)]
    steps += [engine.model.forward(ids[i:i + 1], cache) for i in range(20, 30)]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


def test_sliding_layers_keep_only_the_window(tiny_dir):
    engine = Engine.load(tiny_dir, precision="reference")
    cache = engine.model.new_cache()
    engine.model.forward(np.arange(40), cache)
    ring = engine.config.sliding_window + cache.RING_SLACK  # the window and room for a verified chunk
    assert cache.k[0].shape[0] == ring and cache.k[1].shape[0] >= 40
    np.testing.assert_array_equal(np.sort(cache.pos[0]), np.arange(40 - ring, 40))
    np.testing.assert_array_equal(cache.pos[1][:40], np.arange(40))
    for t in range(40, 43):  # decoded tokens take the ring slot of the entry a ring behind
        engine.model.forward(np.array([t]), cache)
    np.testing.assert_array_equal(np.sort(cache.pos[0]), np.arange(43 - ring, 43))


def test_query_chunks_see_exactly_the_keys_of_one_pass(monkeypatch):
    """Attention in query chunks (each against the keys it can see) equals one pass over all keys."""
    from coordinator.models import layers

    rng = np.random.default_rng(5)
    T, nq, nkv, d = 40, 4, 2, 8
    q = rng.standard_normal((T, nq, d)).astype(np.float32)
    k, v = (rng.standard_normal((T + 6, nkv, d)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(nq).astype(np.float32)
    q_pos, k_pos = np.arange(6, 6 + T), np.arange(T + 6)
    for window in (None, 5):
        whole = layers.attend_chunk(q, k, v, sinks, q_pos, k_pos, window)
        monkeypatch.setattr(layers, "ATTENTION_QUERY_CHUNK", 7)
        np.testing.assert_allclose(attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window), whole, rtol=1e-5, atol=1e-6)
        monkeypatch.undo()
