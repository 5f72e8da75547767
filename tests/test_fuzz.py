"""Fuzzing the boundaries (hypothesis): wire messages, the node's request validation and every
native entry point. Every input ends either in a result of the right shape or in a clean
ValueError / WireError / DecodeError — never a crash."""
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_node import native
from expert_node.proto import moemesh_pb2 as pb
from expert_node.protocol import WireError, decode_tensor
from expert_node.server import ExpertNodeService
from expert_node.store import build_layer
from expert_node.experts import ExpertShape, LayerExperts

EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from(["f32", "q16", "i32", "bf16", "", "f64", "\x00"]),
    shape=st.lists(st.integers(-3, 70), max_size=4),
    data=st.binary(max_size=600),
)


@FUZZ
@given(t=tensors, ndim=st.integers(0, 3))
def test_tensor_decoding_never_crashes(t, ndim):
    try:
        a = decode_tensor(t, "x", ("f32", "q16", "i32"), ndim)
    except WireError:
        return
    assert a.shape == tuple(t.shape)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_request_parsing_never_crashes(raw):
    try:
        pb.ExpertRequest.FromString(raw)
    except DecodeError:
        pass


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    shape = ExpertShape(n_experts=4, hidden=64, inter=32, swiglu_limit=7.0)
    rng = np.random.default_rng(0)
    size = LayerExperts.piece_nbytes(shape)
    pieces = [rng.integers(0, 120, size, dtype=np.uint8).tobytes() for _ in range(2)]
    svc = ExpertNodeService("fuzz", tmp_path_factory.mktemp("fuzz-node"))
    svc.shape, svc.layers = shape, {0: build_layer(pieces, [1, 3], shape)}
    return svc


@FUZZ
@given(layer=st.integers(0, 2), x=tensors, ids=tensors, precision=st.sampled_from(["exact", "fast", "int4", ""]))
def test_node_request_validation_never_crashes(service, layer, x, ids, precision):
    request = pb.ExpertRequest(seq=1, layer=layer, x=x, expert_ids=ids, precision=precision)
    try:
        hosted, xa, local, _ = service._decode(request)
    except (WireError, ValueError):
        return
    out = np.empty(local.shape + (xa.shape[1],), np.float32)
    w = hosted.weights
    native.moe_experts(xa, local, w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks,
                       w.down_scales, w.down_bias, out, precision=precision)
    assert np.isfinite(out).all()


arrays = st.builds(
    lambda shape, dtype, seed: np.random.default_rng(seed).integers(-3, 200, shape).astype(dtype),
    st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64]),
    st.integers(0, 2**16),
)


@FUZZ
@given(args=st.lists(arrays, min_size=9, max_size=9))
def test_native_moe_entry_point_never_crashes(args):
    try:
        native.moe_experts(*args[:9])
    except ValueError:
        pass


@FUZZ
@given(x=arrays, w=arrays, b=st.none() | arrays, out=arrays)
def test_native_matmul_and_dequant_never_crash(x, w, b, out):
    try:
        native.bf16_matmul(x, w, b, out)
    except ValueError:
        pass
    try:
        native.mxfp4_dequant(x, w)
    except ValueError:
        pass


def test_finite_but_huge_activations_are_refused(service):
    """Found by bench/fuzz.py (atheris): finite inputs near float's limit overflowed to inf."""
    x = np.full((1, 64), 1e30, np.float32)
    ids = np.array([[1, 3]], np.int32)
    request = pb.ExpertRequest(seq=1, layer=0, precision="exact",
                               x=pb.Tensor(dtype="f32", shape=[1, 64], data=x.tobytes()),
                               expert_ids=pb.Tensor(dtype="i32", shape=[1, 2], data=ids.tobytes()))
    with pytest.raises(WireError, match="beyond"):
        service._decode(request)
