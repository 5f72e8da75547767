"""MXFP4 decoding: the nibble order and gate/up interleave are pinned, the native decode matches."""
import numpy as np
import pytest

from expert_node import native
from expert_node.formats import FP4_VALUES, MXFP4, QUANT_FORMATS, mxfp4_unpack_codes
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


@pytest.mark.parametrize("fmt", list(QUANT_FORMATS.values()), ids=list(QUANT_FORMATS))
def test_native_dequant_matches_reference_exactly(fmt):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 4, fmt.block_bytes), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(native.mxfp4_dequant(blocks, scales), fmt.dequant(blocks, scales))


def test_native_dequant_rejects_bad_shapes():
    with pytest.raises(ValueError, match="blocks: last axis must be 16"):
        native.mxfp4_dequant(np.zeros((2, 15), np.uint8), np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match="scales: expected shape"):
        native.mxfp4_dequant(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="blocks: expected dtype uint8"):
        native.mxfp4_dequant(np.zeros((2, 16), np.int32), np.zeros((2,), np.uint8))
