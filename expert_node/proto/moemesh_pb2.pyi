from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("protocol_version", "coordinator_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    coordinator_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., coordinator_id: _Optional[str] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("protocol_version", "node_id", "name", "cores", "isa", "memory_total", "memory_budget", "model_id", "hosted", "weight_bytes", "calls", "max_tokens", "max_streams", "token_us", "batch64_us")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    ISA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_US_FIELD_NUMBER: _ClassVar[int]
    BATCH64_US_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    name: str
    cores: int
    isa: str
    memory_total: int
    memory_budget: int
    model_id: str
    hosted: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    weight_bytes: int
    calls: int
    max_tokens: int
    max_streams: int
    token_us: int
    batch64_us: int
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ..., cores: _Optional[int] = ..., isa: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_budget: _Optional[int] = ..., model_id: _Optional[str] = ..., hosted: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., weight_bytes: _Optional[int] = ..., calls: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_streams: _Optional[int] = ..., token_us: _Optional[int] = ..., batch64_us: _Optional[int] = ...) -> None: ...

class PieceRef(_message.Message):
    __slots__ = ("layer", "expert", "nbytes", "sha256")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    nbytes: int
    sha256: str
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ExpertSpec(_message.Message):
    __slots__ = ("format", "activation", "layers", "experts", "experts_per_token", "hidden", "intermediate", "swiglu_alpha", "swiglu_limit", "tensor_prefix")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_FIELD_NUMBER: _ClassVar[int]
    SWIGLU_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SWIGLU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PREFIX_FIELD_NUMBER: _ClassVar[int]
    format: str
    activation: str
    layers: int
    experts: int
    experts_per_token: int
    hidden: int
    intermediate: int
    swiglu_alpha: float
    swiglu_limit: float
    tensor_prefix: str
    def __init__(self, format: _Optional[str] = ..., activation: _Optional[str] = ..., layers: _Optional[int] = ..., experts: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., hidden: _Optional[int] = ..., intermediate: _Optional[int] = ..., swiglu_alpha: _Optional[float] = ..., swiglu_limit: _Optional[float] = ..., tensor_prefix: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("model_id", "pieces", "spec")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    pieces: _containers.RepeatedCompositeFieldContainer[PieceRef]
    spec: ExpertSpec
    def __init__(self, model_id: _Optional[str] = ..., pieces: _Optional[_Iterable[_Union[PieceRef, _Mapping]]] = ..., spec: _Optional[_Union[ExpertSpec, _Mapping]] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedCompositeFieldContainer[PieceRef]
    def __init__(self, missing: _Optional[_Iterable[_Union[PieceRef, _Mapping]]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("layer", "expert", "offset", "data", "crc32")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    offset: int
    data: bytes
    crc32: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("stored", "rejected")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedCompositeFieldContainer[PieceRef]
    rejected: _containers.RepeatedCompositeFieldContainer[PieceRef]
    def __init__(self, stored: _Optional[_Iterable[_Union[PieceRef, _Mapping]]] = ..., rejected: _Optional[_Iterable[_Union[PieceRef, _Mapping]]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("weight_bytes", "load_us", "missing")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_US_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    load_us: int
    missing: _containers.RepeatedCompositeFieldContainer[PieceRef]
    def __init__(self, weight_bytes: _Optional[int] = ..., load_us: _Optional[int] = ..., missing: _Optional[_Iterable[_Union[PieceRef, _Mapping]]] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("seq", "layer", "x", "expert_ids", "precision")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer: int
    x: Tensor
    expert_ids: Tensor
    precision: str
    def __init__(self, seq: _Optional[int] = ..., layer: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., precision: _Optional[str] = ...) -> None: ...

class NodeTiming(_message.Message):
    __slots__ = ("queue_us", "decode_us", "compute_us", "encode_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    decode_us: int
    compute_us: int
    encode_us: int
    def __init__(self, queue_us: _Optional[int] = ..., decode_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., encode_us: _Optional[int] = ...) -> None: ...

class ExpertReply(_message.Message):
    __slots__ = ("seq", "y", "timing")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    y: Tensor
    timing: NodeTiming
    def __init__(self, seq: _Optional[int] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ..., timing: _Optional[_Union[NodeTiming, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
