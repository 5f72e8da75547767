"""MXFP4 decoding: the nibble order and gate/up interleave are pinned, the native decode matches."""
import numpy as np
import pytest

from expert_node import native
from expert_node.checkpoint import bf16_to_f32, f32_to_bf16
from expert_node.formats import FP4_VALUES, MXFP4, Q4, Q8, QUANT_FORMATS, mxfp4_unpack_codes
from expert_node.reference import split_gate_up


def test_low_nibble_is_the_even_element():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (+1.0) -> element 0, high nibble 7 (+6.0) -> element 1
    blocks[0, 15] = 0xF9  # low 9 (-0.5) -> element 30, high 15 (-6.0) -> element 31
    w = MXFP4.dequant(blocks, np.array([127], np.uint8))
    assert w.shape == (32,)
    assert (w[0], w[1], w[30], w[31]) == (1.0, 6.0, -0.5, -6.0)
    assert not w[2:30].any()


def test_scale_is_a_power_of_two_with_bias_127():
    blocks = np.full((3, 16), 0x22, np.uint8)  # every element +1.0
    w = MXFP4.dequant(blocks, np.array([127, 130, 120], np.uint8))
    np.testing.assert_array_equal(w.reshape(3, 32)[:, 0], [1.0, 8.0, 2.0 ** -7])


def test_codes_cover_the_e2m1_table():
    codes = mxfp4_unpack_codes(np.array([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2], np.uint8))
    np.testing.assert_array_equal(FP4_VALUES[codes[0, :16]], FP4_VALUES)


def test_gate_is_even_up_is_odd():
    gate, up = split_gate_up(np.arange(8.0))
    np.testing.assert_array_equal(gate, [0, 2, 4, 6])
    np.testing.assert_array_equal(up, [1, 3, 5, 7])


def test_native_dequant_matches_reference_exactly():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(native.mxfp4_dequant(blocks, scales), MXFP4.dequant(blocks, scales))


@pytest.mark.parametrize("fmt", list(QUANT_FORMATS.values()), ids=list(QUANT_FORMATS))
def test_native_quantize_gives_the_references_bytes(fmt):
    """The converter's native quantizer writes the numpy spec's bytes, for magnitudes from fp16's
    subnormals to far beyond its range, zero blocks and ties; NaN refused by position."""
    rng = np.random.default_rng(1)
    w = f32_to_bf16((rng.standard_normal((37, 256)) * np.exp2(rng.integers(-30, 20, (37, 1)))).astype(np.float32))
    w[0, :32] = 0
    w[1, :8] = f32_to_bf16(np.array([0.25, -0.75, 1.25, -1.75, 2.5, 3.5, 5.0, -6.0], np.float32))
    w[2, :32] = f32_to_bf16(np.array([1.0] * 16 + [-1.0] * 16, np.float32))  # a tie for the extreme: the first
    values_shape, scales_shape = fmt.packed_shapes(37, 256)
    values = np.empty(values_shape, np.int8 if fmt.values_dtype == "I8" else np.uint8)
    scales = np.empty(scales_shape, np.uint16 if fmt.scale_bytes == 2 else np.uint8)
    native.quantize(fmt.name, w, values, scales)
    ref_values, ref_scales = fmt.quantize(bf16_to_f32(w))
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(values, ref_values.reshape(values_shape))
    w[3, 5] = 0x7FC0  # NaN
    with pytest.raises(ValueError, match="NaN or Inf at flat index 773"):
        native.quantize(fmt.name, w, values, scales)


@pytest.mark.parametrize("fmt", [Q4, Q8], ids=["q4", "q8"])
def test_integer_formats_round_to_the_nearest_step_of_their_fp16_scale(fmt):
    """Q4 (llama.cpp's Q4_0 values): the block's extreme lands on -8; Q8: on +-127; every value is
    within half a step of the scale as stored (fp16) unless clipped at the range's end."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 128)) * np.exp2(rng.integers(-6, 6, (8, 1)))).astype(np.float32)
    values, scales = fmt.quantize(w)
    d = scales.view(np.float16).astype(np.float32)
    blocks = w.reshape(8, 4, 32)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(d, np.abs(extreme) / (8 if fmt is Q4 else 127) * (-np.sign(extreme) if fmt is Q4 else 1),
                               rtol=2 ** -10)
    back = fmt.dequant(values, scales).reshape(8, 4, 32)
    step = np.abs(d)[..., None]
    top = 7 if fmt is Q4 else 127
    inside = np.abs(blocks / step) <= top
    assert np.all(np.abs(back - blocks)[inside] <= step.repeat(32, -1)[inside] * (0.5 + 2 ** -10))
    if fmt is Q4:
        codes = mxfp4_unpack_codes(values).reshape(8, 4, 32)
        assert np.all(np.take_along_axis(codes, np.abs(blocks).argmax(-1)[..., None], -1) == 0)


def test_native_dequant_rejects_bad_shapes():
    with pytest.raises(ValueError, match="blocks: last axis must be 16"):
        native.mxfp4_dequant(np.zeros((2, 15), np.uint8), np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match="scales: expected shape"):
        native.mxfp4_dequant(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="blocks: expected dtype uint8"):
        native.mxfp4_dequant(np.zeros((2, 16), np.int32), np.zeros((2,), np.uint8))
