"""Wire format: tensors round-trip, bad messages are named, committed stubs are current."""
import filecmp
import json
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expert_node.experts import round_activations
from expert_node.protocol import WireError, decode_tensor, encode_tensor
from expert_node.proto import moemesh_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_f32_and_i32_round_trip_exactly():
    a = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(a, "f32"), "x", ("f32",), 2), a)
    ids = np.array([[1, -1], [3, 0]], np.int32)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(ids, "i32"), "ids", ("i32",), 2), ids)


def test_q16_on_the_wire_equals_local_rounding():
    a = (np.random.default_rng(1).standard_normal((5, 96)) * 10).astype(np.float32)
    wire = decode_tensor(encode_tensor(a, "q16"), "x", ("q16",), 2)
    np.testing.assert_array_equal(wire, round_activations(a, "fast"))
    assert np.abs(wire - a).max() <= np.abs(a).max() / 32639
    assert len(encode_tensor(a, "q16").data) == a.size * 2 + a.size // 32 * 4


def test_native_q16_is_the_numpy_reference_bit_for_bit():
    """The wire and the backends use the native q16; formats.q16_quantize is its spec."""
    from expert_node import native
    from expert_node.formats import q16_dequantize, q16_quantize

    rng = np.random.default_rng(3)
    a = (rng.standard_normal((7, 4, 2880)) * rng.choice([1e-3, 1.0, 1e3], (7, 4, 1))).astype(np.float32)
    a[0, 0, :32] = 0.0  # an all-zero block
    a[1, 0, :32] = np.arange(32, dtype=np.float32) - 16.5  # halves: ties in the rounding
    q_ref, d_ref = q16_quantize(a)
    q, d = native.q16_quantize(a)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(native.q16_dequantize(q, d), q16_dequantize(q_ref, d_ref))
    np.testing.assert_array_equal(native.q16_round(a), q16_dequantize(q_ref, d_ref))
    for fn in (native.q16_quantize, native.q16_round):
        with pytest.raises(ValueError, match="multiple of 32"):
            fn(np.zeros((2, 30), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        native.q16_round(np.full((1, 32), np.nan, np.float32))


def test_the_native_wire_codec_is_the_numpy_one():
    """Both sides pass the native codec on their hot paths; numpy's is the spec: the same bytes,
    values and limit checks (NaN and Inf included)."""
    from expert_node import native
    from expert_node.protocol import NUMPY_CODEC

    fast = native.wire_codec()
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((6, 2880)) * rng.choice([1e-3, 1.0, 1e3], (6, 1))).astype(np.float32)
    a[0, :32] = 0.0
    for dtype in ("f32", "q16"):
        sent = encode_tensor(a, dtype, fast)
        assert sent.data == encode_tensor(a, dtype, NUMPY_CODEC).data
        np.testing.assert_array_equal(decode_tensor(sent, "x", (dtype,), 2, limit=1e6, codec=fast),
                                      decode_tensor(sent, "x", (dtype,), 2, limit=1e6))
    bad = a.copy()
    bad[2, 5] = np.nan
    for codec in (fast, NUMPY_CODEC):
        with pytest.raises(WireError, match="NaN or Inf"):
            decode_tensor(encode_tensor(bad, "f32"), "x", ("f32",), 2, limit=1e6, codec=codec)
    scales_nan = bytearray(encode_tensor(a, "q16").data)
    scales_nan[-4:] = np.array([np.nan], "<f4").tobytes()
    for codec in (fast, NUMPY_CODEC):
        with pytest.raises(WireError, match="NaN or Inf"):
            decode_tensor(pb.Tensor(dtype="q16", shape=[6, 2880], data=bytes(scales_nan)), "x", ("q16",), 2,
                          limit=1e6, codec=codec)


def test_the_wire_imports_neither_side():
    """expert_node.protocol loads without the native extension or any node or coordinator logic."""
    code = ("import json, sys, expert_node.protocol; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('coordinator', 'expert_node')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["expert_node", "expert_node.formats", "expert_node.proto", "expert_node.proto.moemesh_pb2",
                            "expert_node.protocol"]


@pytest.mark.parametrize("dtype", ["f32", "q16"])
def test_limits_are_checked_on_decode(dtype):
    """A receiver's limit: values must be finite and within it, whatever the wire dtype."""
    a = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(a, dtype), "x", (dtype,), 2, limit=10.0),
                                  decode_tensor(encode_tensor(a, dtype), "x", (dtype,), 2))
    with pytest.raises(WireError, match=r"x: values beyond ±0.5"):
        decode_tensor(encode_tensor(a, dtype), "x", (dtype,), 2, limit=0.5)
    bad = encode_tensor(a, dtype)
    raw = bytearray(bad.data)
    nan_at = len(raw) - 4 if dtype == "q16" else 8  # q16: the last block's scale
    raw[nan_at:nan_at + 4] = np.array([np.nan], "<f4").tobytes()
    bad.data = bytes(raw)
    with pytest.raises(WireError, match="x: contains NaN or Inf"):
        decode_tensor(bad, "x", (dtype,), 2, limit=10.0)


@pytest.mark.parametrize("msg,match", [
    (pb.Tensor(dtype="f64", shape=[1, 2], data=b"\0" * 16), "dtype 'f64' not accepted"),
    (pb.Tensor(dtype="f32", shape=[2], data=b"\0" * 8), "expected a 2-D shape"),
    (pb.Tensor(dtype="f32", shape=[2, 2], data=b"\0" * 15), "15 bytes do not hold f32"),
    (pb.Tensor(dtype="f32", shape=[2, -2], data=b""), "expected a 2-D shape"),
    (pb.Tensor(dtype="q16", shape=[1, 30], data=b"\0" * 60), "multiple of 32"),
])
def test_bad_tensors_are_named(msg, match):
    with pytest.raises(WireError, match=match):
        decode_tensor(msg, "x", ("f32", "q16"), 2)


def test_committed_stubs_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = ROOT / "expert_node" / "proto"
    for name in ("moemesh_pb2.py", "moemesh_pb2.pyi", "moemesh_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), f"{name} is stale: run protos/generate.py"
