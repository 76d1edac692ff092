from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    FP32: _ClassVar[Encoding]
    FP16: _ClassVar[Encoding]
    BF16: _ClassVar[Encoding]
    INT8: _ClassVar[Encoding]

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    HIDDEN: _ClassVar[InputKind]
    TOKENS: _ClassVar[InputKind]

class KvFill(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_FILL_UNSPECIFIED: _ClassVar[KvFill]
    EXACT: _ClassVar[KvFill]
    PROPAGATE: _ClassVar[KvFill]
ENCODING_UNSPECIFIED: Encoding
FP32: Encoding
FP16: Encoding
BF16: Encoding
INT8: Encoding
INPUT_KIND_UNSPECIFIED: InputKind
HIDDEN: InputKind
TOKENS: InputKind
KV_FILL_UNSPECIFIED: KvFill
EXACT: KvFill
PROPAGATE: KvFill

class Tensor(_message.Message):
    __slots__ = ("encoding", "rows", "cols", "data", "scales")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    rows: int
    cols: int
    data: bytes
    scales: bytes
    def __init__(self, encoding: _Optional[_Union[Encoding, str]] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "kv_budget_bytes", "max_length", "max_rows_per_append", "max_message_bytes", "idle_ttl_s")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_APPEND_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    kv_budget_bytes: int
    max_length: int
    max_rows_per_append: int
    max_message_bytes: int
    idle_ttl_s: float
    def __init__(self, max_sessions: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., max_length: _Optional[int] = ..., max_rows_per_append: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., idle_ttl_s: _Optional[float] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("fingerprint", "split_layer", "num_layers", "hidden_size", "vocab_size", "exit_layers", "encodings", "limits", "serves_tokens", "version", "features")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVES_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    split_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    exit_layers: _containers.RepeatedScalarFieldContainer[int]
    encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    limits: Limits
    serves_tokens: bool
    version: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fingerprint: _Optional[str] = ..., split_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., exit_layers: _Optional[_Iterable[int]] = ..., encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., serves_tokens: _Optional[bool] = ..., version: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class CloudExit(_message.Message):
    __slots__ = ("layer", "threshold")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    threshold: float
    def __init__(self, layer: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("fingerprint", "resume_id", "max_length", "encoding", "input", "stateless", "cloud_exits", "kv_fill", "open_if_missing")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RESUME_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    STATELESS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_EXITS_FIELD_NUMBER: _ClassVar[int]
    KV_FILL_FIELD_NUMBER: _ClassVar[int]
    OPEN_IF_MISSING_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    resume_id: str
    max_length: int
    encoding: Encoding
    input: InputKind
    stateless: bool
    cloud_exits: _containers.RepeatedCompositeFieldContainer[CloudExit]
    kv_fill: KvFill
    open_if_missing: bool
    def __init__(self, fingerprint: _Optional[str] = ..., resume_id: _Optional[str] = ..., max_length: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., input: _Optional[_Union[InputKind, str]] = ..., stateless: _Optional[bool] = ..., cloud_exits: _Optional[_Iterable[_Union[CloudExit, _Mapping]]] = ..., kv_fill: _Optional[_Union[KvFill, str]] = ..., open_if_missing: _Optional[bool] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session_id", "length", "resumed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    resumed: bool
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ..., resumed: _Optional[bool] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("first_position", "hidden", "token_ids", "want_token", "sampling", "top_logprobs", "want_logits", "drafts", "fill_rows")
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WANT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    WANT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    FILL_ROWS_FIELD_NUMBER: _ClassVar[int]
    first_position: int
    hidden: Tensor
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    want_token: bool
    sampling: Sampling
    top_logprobs: int
    want_logits: bool
    drafts: _containers.RepeatedCompositeFieldContainer[Draft]
    fill_rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first_position: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., want_token: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., top_logprobs: _Optional[int] = ..., want_logits: _Optional[bool] = ..., drafts: _Optional[_Iterable[_Union[Draft, _Mapping]]] = ..., fill_rows: _Optional[_Iterable[int]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("position", "token_id", "support_ids", "support_probs")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_PROBS_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    support_ids: _containers.RepeatedScalarFieldContainer[int]
    support_probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., support_ids: _Optional[_Iterable[int]] = ..., support_probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("position", "accepted", "token_id", "logprob")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    position: int
    accepted: bool
    token_id: int
    logprob: float
    def __init__(self, position: _Optional[int] = ..., accepted: _Optional[bool] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class AppendReply(_message.Message):
    __slots__ = ("length", "has_token", "token_id", "logprob", "exit_layer", "top", "logits", "layer_tokens", "compute_us", "verdicts", "discarded", "filled_layer_rows", "queue_us")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LAYER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    FILLED_LAYER_ROWS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    length: int
    has_token: bool
    token_id: int
    logprob: float
    exit_layer: int
    top: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    logits: Tensor
    layer_tokens: int
    compute_us: int
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    discarded: bool
    filled_layer_rows: int
    queue_us: int
    def __init__(self, length: _Optional[int] = ..., has_token: _Optional[bool] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., exit_layer: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., layer_tokens: _Optional[int] = ..., compute_us: _Optional[int] = ..., verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., discarded: _Optional[bool] = ..., filled_layer_rows: _Optional[int] = ..., queue_us: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("bytes_received", "bytes_sent")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_sent: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms",)
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    def __init__(self, sent_unix_ms: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "append", "close", "rollback", "heartbeat")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    open: OpenRequest
    append: AppendRequest
    close: CloseRequest
    rollback: RollbackRequest
    heartbeat: Heartbeat
    def __init__(self, open: _Optional[_Union[OpenRequest, _Mapping]] = ..., append: _Optional[_Union[AppendRequest, _Mapping]] = ..., close: _Optional[_Union[CloseRequest, _Mapping]] = ..., rollback: _Optional[_Union[RollbackRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("opened", "appended", "closed", "rolled_back", "heartbeat")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    opened: OpenReply
    appended: AppendReply
    closed: CloseReply
    rolled_back: RollbackReply
    heartbeat: Heartbeat
    def __init__(self, opened: _Optional[_Union[OpenReply, _Mapping]] = ..., appended: _Optional[_Union[AppendReply, _Mapping]] = ..., closed: _Optional[_Union[CloseReply, _Mapping]] = ..., rolled_back: _Optional[_Union[RollbackReply, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...
