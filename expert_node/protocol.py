"""Wire format of the expert-node protocol: versions, limits, and tensor <-> message conversion.

The one module both sides speak through; it imports neither side's logic nor the native module
(only the generated messages and formats.py's q16 spec), so the wire can be read, tested and
changed on its own. Pure functions over protobuf messages, tested without sockets. Tensors travel
as one message (dtype, shape, raw little-endian bytes); every decode checks dtype, shape and byte
length against what the caller expects and raises WireError (which the server turns into
INVALID_ARGUMENT). The q16 arithmetic is a Codec each side passes in: numpy's by default (the
spec), the native one on the hot paths (expert_node.native.wire_codec; the same bytes and values).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .formats import ACTIVATION_DTYPE, Q16_BLOCK, q16_dequantize, q16_quantize
from .proto import moemesh_pb2 as pb

PROTOCOL_VERSION = 2  # 2: an Assignment carries an ExpertSpec, not the model's config.json
SERVICE_TYPE = "_moemesh._tcp.local."
# Most token rows one ExpertRequest may carry (announced in NodeInfo.max_tokens). The engine's
# prefill chunk is 512 tokens; twice that leaves room for a batched step. Every dimension of a
# request is checked against this and the model before anything is allocated (a crafted
# [1, 2^23] id tensor once made a node allocate gigabytes).
MAX_REQUEST_TOKENS = 1024
MAX_HIDDEN = 8192  # widest hidden size a node accepts (gpt-oss: 2880, Qwen3-30B-A3B: 2048)
# What a node receives: one request of MAX_REQUEST_TOKENS fp32 rows at MAX_HIDDEN plus its ids, or
# a weight chunk. gRPC refuses anything larger from its length prefix, before buffering it.
MAX_REQUEST_BYTES = MAX_REQUEST_TOKENS * MAX_HIDDEN * 4 + (1 << 20)
# What a coordinator receives: a reply carries every (token, slot) output of a request, k times
# the rows of x (at gpt-oss's width and k=4, 512 rows: 24 MB).
MAX_REPLY_BYTES = 128 << 20
WEIGHT_CHUNK_BYTES = 2 << 20
# Largest activation a node accepts. Expert inputs are RMS-normalized (hundreds at most); finite
# values near float's limit would overflow the dot products into inf (found by bench/fuzz.py).
MAX_ACTIVATION = 1e6
# Compute streams one connection may hold open (a coordinator needs one per node) and a node in
# all: idle streams hold no thread (the server is asyncio), but each holds some memory.
MAX_STREAMS_PER_PEER = 4
MAX_STREAMS = 256
DEFAULT_KEEPALIVE_MS = 10_000
MIN_PING_INTERVAL_MS = 1_000  # the most frequent pings a node permits (tests shorten it further)


def keepalive_ms() -> int:
    """The coordinator's ping interval on idle connections (MOEMESH_KEEPALIVE_MS shortens it for
    tests). Nodes permit a ping a second (or twice this rate, if faster): gRPC servers answer
    pings more frequent than they allow with GOAWAY too_many_pings, which once dropped every node
    of a chat left idle for a minute (the client pinged every 10 s, the server allowed one per 5
    minutes)."""
    return int(os.environ.get("MOEMESH_KEEPALIVE_MS", DEFAULT_KEEPALIVE_MS))


def client_options() -> list[tuple[str, int]]:
    k = keepalive_ms()
    return [("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
            ("grpc.keepalive_time_ms", k),
            ("grpc.keepalive_timeout_ms", max(k // 2, 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def server_options() -> list[tuple[str, int]]:
    k = keepalive_ms()
    return [("grpc.max_send_message_length", MAX_REPLY_BYTES),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # Accept the coordinator's pings (see keepalive_ms), with or without a call in flight,
            # up to one a second whatever the coordinator was told (a ping costs next to nothing).
            ("grpc.http2.min_ping_interval_without_data_ms", min(MIN_PING_INTERVAL_MS, k // 2)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # A node notices a vanished coordinator too, and frees its stream.
            ("grpc.keepalive_time_ms", 2 * k),
            ("grpc.keepalive_timeout_ms", max(k // 2, 1000)),
            # Refuse a port another process holds (gRPC sets SO_REUSEPORT by default: two nodes
            # then shared one address, each getting half the connections).
            ("grpc.so_reuseport", 0)]


WIRE_DTYPES = {"f32": np.dtype("<f4"), "q16": np.dtype("<i2"), "i32": np.dtype("<i4")}


@dataclass(frozen=True)
class Codec:
    """The arithmetic under the wire's tensors. q16_encode: float32 [..., n] -> every code, then
    every scale; q16_decode: (bytes, rows, cols) -> (float32 [rows, cols], its largest |value|);
    max_abs: the largest |value| of a float32 array. Both largest values are inf when any value
    is NaN or infinite."""
    q16_encode: Callable[[np.ndarray], bytes]
    q16_decode: Callable[[bytes, int, int], tuple[np.ndarray, float]]
    max_abs: Callable[[np.ndarray], float]


def _max_abs(a: np.ndarray) -> float:
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    return peak if np.isfinite(peak) else float("inf")


def _q16_encode(a: np.ndarray) -> bytes:
    q, d = q16_quantize(np.ascontiguousarray(a, np.float32))
    return q.astype("<i2").tobytes() + d.astype("<f4").tobytes()


def _q16_decode(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, float]:
    n = rows * cols
    q = np.frombuffer(data, "<i2", count=n).reshape(rows, cols)
    d = np.frombuffer(data, "<f4", count=n // Q16_BLOCK, offset=2 * n).reshape(rows, cols // Q16_BLOCK)
    a = q16_dequantize(q, d)
    return a, _max_abs(a)


NUMPY_CODEC = Codec(_q16_encode, _q16_decode, _max_abs)


class WireError(ValueError):
    """A message that does not carry what it must; the text says what and why."""


def encode_tensor(a: np.ndarray, dtype: str, codec: Codec = NUMPY_CODEC) -> pb.Tensor:
    """float32 -> f32, or q16 (int16 codes then float32 per-32 scales); int32 -> i32."""
    if dtype == "q16":
        raw = codec.q16_encode(np.ascontiguousarray(a, np.float32))
    else:
        raw = np.ascontiguousarray(a, WIRE_DTYPES[dtype]).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(a.shape), data=raw)


def decode_tensor(t: pb.Tensor, name: str, dtypes: tuple[str, ...], ndim: int,
                  limit: float | None = None, codec: Codec = NUMPY_CODEC) -> np.ndarray:
    """Checked decode: floats come back as float32, ids as int32. With `limit`, float values must
    be finite and within ±limit."""
    if t.dtype not in dtypes:
        raise WireError(f"{name}: dtype {t.dtype!r} not accepted here (expected {' or '.join(dtypes)})")
    shape = tuple(t.shape)
    if len(shape) != ndim or any(d < 0 for d in shape):
        raise WireError(f"{name}: expected a {ndim}-D shape, got {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    dt = WIRE_DTYPES[t.dtype]
    if t.dtype == "q16" and (ndim == 0 or shape[-1] % Q16_BLOCK):
        raise WireError(f"{name}: q16 needs a last dimension that is a multiple of {Q16_BLOCK}, got {list(shape)}")
    expected = count * dt.itemsize + (count // Q16_BLOCK * 4 if t.dtype == "q16" else 0)
    if len(t.data) != expected:
        raise WireError(f"{name}: {len(t.data)} bytes do not hold {t.dtype}{list(shape)} ({expected} bytes)")
    if t.dtype == "q16":
        a, peak = codec.q16_decode(t.data, count // shape[-1] if shape[-1] else 0, shape[-1])
        a = a.reshape(shape)
    else:
        a = np.frombuffer(t.data, dt, count=count).reshape(shape)
        peak = codec.max_abs(a) if limit is not None and t.dtype == "f32" else 0.0
    if limit is not None:
        if not np.isfinite(peak):
            raise WireError(f"{name}: contains NaN or Inf")
        if peak > limit:
            raise WireError(f"{name}: values beyond ±{limit:g}")
    return a


def layer_prefix(template: str, layer: int) -> str:
    """An ExpertSpec's tensor prefix for one layer ("{layer}" stands for its number; a plain
    substitution, as the text may be a peer's)."""
    return template.replace("{layer}", str(layer))


def activation_dtype(precision: str) -> str:
    if precision not in ("exact", "fast"):
        raise WireError(f"precision: expected 'exact' or 'fast', got {precision!r}")
    return ACTIVATION_DTYPE[precision]


def pieces_to_layers(pieces) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for p in pieces:
        layers.setdefault(int(p.layer), []).append(int(p.expert))
    return {layer: sorted(experts) for layer, experts in sorted(layers.items())}
