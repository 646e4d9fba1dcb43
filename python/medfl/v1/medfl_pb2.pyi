from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StudyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STUDY_STATE_UNSPECIFIED: _ClassVar[StudyState]
    STUDY_STATE_CREATED: _ClassVar[StudyState]
    STUDY_STATE_RUNNING: _ClassVar[StudyState]
    STUDY_STATE_PAUSED: _ClassVar[StudyState]
    STUDY_STATE_COMPLETED: _ClassVar[StudyState]
    STUDY_STATE_ABORTED: _ClassVar[StudyState]
    STUDY_STATE_FAILED: _ClassVar[StudyState]
    STUDY_STATE_BUDGET_EXHAUSTED: _ClassVar[StudyState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT: _ClassVar[EventKind]
    EVENT_KIND_STATE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_ROUND_STARTED: _ClassVar[EventKind]
    EVENT_KIND_UPDATE_RECEIVED: _ClassVar[EventKind]
    EVENT_KIND_ROUND_COMMITTED: _ClassVar[EventKind]
    EVENT_KIND_ROUND_FAILED: _ClassVar[EventKind]
    EVENT_KIND_SITE_REFUSED: _ClassVar[EventKind]
STUDY_STATE_UNSPECIFIED: StudyState
STUDY_STATE_CREATED: StudyState
STUDY_STATE_RUNNING: StudyState
STUDY_STATE_PAUSED: StudyState
STUDY_STATE_COMPLETED: StudyState
STUDY_STATE_ABORTED: StudyState
STUDY_STATE_FAILED: StudyState
STUDY_STATE_BUDGET_EXHAUSTED: StudyState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_SNAPSHOT: EventKind
EVENT_KIND_STATE_CHANGED: EventKind
EVENT_KIND_ROUND_STARTED: EventKind
EVENT_KIND_UPDATE_RECEIVED: EventKind
EVENT_KIND_ROUND_COMMITTED: EventKind
EVENT_KIND_ROUND_FAILED: EventKind
EVENT_KIND_SITE_REFUSED: EventKind

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("study_id", "round", "manifest_hash", "tensors", "num_params")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    manifest_hash: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_params: int
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., manifest_hash: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_params: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("seq", "offset", "values")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    offset: int
    values: bytes
    def __init__(self, seq: _Optional[int] = ..., offset: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: DataChunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[_Union[DataChunk, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_der")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_der: bytes
    def __init__(self, token: _Optional[str] = ..., csr_der: _Optional[bytes] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_der",)
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    csr_der: bytes
    def __init__(self, csr_der: _Optional[bytes] = ...) -> None: ...

class CertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "not_after_unix_ms")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    ca_pem: str
    not_after_unix_ms: int
    def __init__(self, certificate_pem: _Optional[str] = ..., ca_pem: _Optional[str] = ..., not_after_unix_ms: _Optional[int] = ...) -> None: ...

class SecAggSession(_message.Message):
    __slots__ = ("session_id", "roster", "threshold", "num_values", "scale_log2", "attempt", "neighbours")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_LOG2_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    roster: _containers.RepeatedScalarFieldContainer[str]
    threshold: int
    num_values: int
    scale_log2: int
    attempt: int
    neighbours: int
    def __init__(self, session_id: _Optional[bytes] = ..., roster: _Optional[_Iterable[str]] = ..., threshold: _Optional[int] = ..., num_values: _Optional[int] = ..., scale_log2: _Optional[int] = ..., attempt: _Optional[int] = ..., neighbours: _Optional[int] = ...) -> None: ...

class SecAggAdvertiseRequest(_message.Message):
    __slots__ = ("session_id", "cipher_public_key", "mask_public_key", "signature", "signature_algorithm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    cipher_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    signature_algorithm: str
    def __init__(self, session_id: _Optional[bytes] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ...) -> None: ...

class SiteKeys(_message.Message):
    __slots__ = ("site", "cipher_public_key", "mask_public_key", "signature", "certificate_der", "signature_algorithm")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    site: str
    cipher_public_key: bytes
    mask_public_key: bytes
    signature: bytes
    certificate_der: bytes
    signature_algorithm: str
    def __init__(self, site: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_der: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("to", "ciphertext")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    to: str
    ciphertext: bytes
    def __init__(self, to: _Optional[str] = ..., ciphertext: _Optional[bytes] = ..., **kwargs) -> None: ...

class SecAggShareKeysRequest(_message.Message):
    __slots__ = ("session_id", "shares")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, session_id: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class SecAggPollRequest(_message.Message):
    __slots__ = ("session_id", "stage", "wait_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    stage: int
    wait_ms: int
    def __init__(self, session_id: _Optional[bytes] = ..., stage: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class SecAggStage(_message.Message):
    __slots__ = ("stage", "ready", "failed", "reason", "u1", "u2", "inbox", "survivors", "dropped")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    U1_FIELD_NUMBER: _ClassVar[int]
    U2_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    stage: int
    ready: bool
    failed: bool
    reason: str
    u1: _containers.RepeatedCompositeFieldContainer[SiteKeys]
    u2: _containers.RepeatedScalarFieldContainer[str]
    inbox: _containers.RepeatedCompositeFieldContainer[SealedShare]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[int] = ..., ready: _Optional[bool] = ..., failed: _Optional[bool] = ..., reason: _Optional[str] = ..., u1: _Optional[_Iterable[_Union[SiteKeys, _Mapping]]] = ..., u2: _Optional[_Iterable[str]] = ..., inbox: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("site", "self_seed", "share")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SELF_SEED_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    site: str
    self_seed: bool
    share: bytes
    def __init__(self, site: _Optional[str] = ..., self_seed: _Optional[bool] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggRevealRequest(_message.Message):
    __slots__ = ("session_id", "shares")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, session_id: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "columns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("agent_version", "datasets")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, agent_version: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("site_name", "heartbeat_interval_ms")
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    site_name: str
    heartbeat_interval_ms: int
    def __init__(self, site_name: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PollWorkRequest(_message.Message):
    __slots__ = ("wait_ms",)
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    wait_ms: int
    def __init__(self, wait_ms: _Optional[int] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("study_id", "round", "manifest_hash", "manifest_toml", "deadline_unix_ms", "num_params", "secagg", "manifest_signature", "creator_certificate_der", "settings", "manifest_signature_algorithm", "query")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_TOML_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CREATOR_CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    manifest_hash: str
    manifest_toml: str
    deadline_unix_ms: int
    num_params: int
    secagg: SecAggSession
    manifest_signature: bytes
    creator_certificate_der: bytes
    settings: RoundSettings
    manifest_signature_algorithm: str
    query: bool
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., manifest_hash: _Optional[str] = ..., manifest_toml: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., num_params: _Optional[int] = ..., secagg: _Optional[_Union[SecAggSession, _Mapping]] = ..., manifest_signature: _Optional[bytes] = ..., creator_certificate_der: _Optional[bytes] = ..., settings: _Optional[_Union[RoundSettings, _Mapping]] = ..., manifest_signature_algorithm: _Optional[str] = ..., query: _Optional[bool] = ...) -> None: ...

class RoundSettings(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "optimizer", "clip_norm", "sample_rate", "steps_per_round", "proximal_mu")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    clip_norm: float
    sample_rate: float
    steps_per_round: int
    proximal_mu: float
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[str] = ..., clip_norm: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps_per_round: _Optional[int] = ..., proximal_mu: _Optional[float] = ...) -> None: ...

class PollWorkResponse(_message.Message):
    __slots__ = ("work",)
    WORK_FIELD_NUMBER: _ClassVar[int]
    work: WorkItem
    def __init__(self, work: _Optional[_Union[WorkItem, _Mapping]] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("study_id", "round")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("study_id", "round", "update_id", "num_examples", "tensors", "num_params", "train_loss", "secagg_session_id", "evaluation")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    update_id: str
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_params: int
    train_loss: float
    secagg_session_id: bytes
    evaluation: Evaluation
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., update_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_params: _Optional[int] = ..., train_loss: _Optional[float] = ..., secagg_session_id: _Optional[bytes] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("examples", "correct", "loss_sum", "score_bins", "noised")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    SCORE_BINS_FIELD_NUMBER: _ClassVar[int]
    NOISED_FIELD_NUMBER: _ClassVar[int]
    examples: int
    correct: int
    loss_sum: float
    score_bins: _containers.RepeatedScalarFieldContainer[int]
    noised: NoisedTotals
    def __init__(self, examples: _Optional[int] = ..., correct: _Optional[int] = ..., loss_sum: _Optional[float] = ..., score_bins: _Optional[_Iterable[int]] = ..., noised: _Optional[_Union[NoisedTotals, _Mapping]] = ...) -> None: ...

class NoisedTotals(_message.Message):
    __slots__ = ("persons", "correct", "loss_sum")
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    persons: float
    correct: float
    loss_sum: float
    def __init__(self, persons: _Optional[float] = ..., correct: _Optional[float] = ..., loss_sum: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: DataChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[_Union[DataChunk, _Mapping]] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("update_id", "values_received")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    values_received: int
    def __init__(self, update_id: _Optional[str] = ..., values_received: _Optional[int] = ...) -> None: ...

class RefusalReport(_message.Message):
    __slots__ = ("study_id", "round", "reason")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    reason: str
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("study_id", "round", "train_loss")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    train_loss: float
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., train_loss: _Optional[float] = ...) -> None: ...

class QueryRef(_message.Message):
    __slots__ = ("query_id",)
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    def __init__(self, query_id: _Optional[str] = ...) -> None: ...

class QueryStatus(_message.Message):
    __slots__ = ("query_id", "name", "manifest_hash", "dataset", "state", "reason", "selected", "answered", "refused", "result_json", "created_ms", "finished_ms", "created_by", "epsilon", "manifest_toml")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_TOML_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    name: str
    manifest_hash: str
    dataset: str
    state: str
    reason: str
    selected: _containers.RepeatedScalarFieldContainer[str]
    answered: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedScalarFieldContainer[str]
    result_json: str
    created_ms: int
    finished_ms: int
    created_by: str
    epsilon: float
    manifest_toml: str
    def __init__(self, query_id: _Optional[str] = ..., name: _Optional[str] = ..., manifest_hash: _Optional[str] = ..., dataset: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., selected: _Optional[_Iterable[str]] = ..., answered: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[str]] = ..., result_json: _Optional[str] = ..., created_ms: _Optional[int] = ..., finished_ms: _Optional[int] = ..., created_by: _Optional[str] = ..., epsilon: _Optional[float] = ..., manifest_toml: _Optional[str] = ...) -> None: ...

class QueryList(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[QueryStatus]
    def __init__(self, queries: _Optional[_Iterable[_Union[QueryStatus, _Mapping]]] = ...) -> None: ...

class CreateStudyRequest(_message.Message):
    __slots__ = ("manifest_toml", "signature", "signature_algorithm")
    MANIFEST_TOML_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    manifest_toml: str
    signature: bytes
    signature_algorithm: str
    def __init__(self, manifest_toml: _Optional[str] = ..., signature: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ...) -> None: ...

class InviteRequest(_message.Message):
    __slots__ = ("name", "ttl_secs", "certificate_days")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DAYS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ttl_secs: int
    certificate_days: int
    def __init__(self, name: _Optional[str] = ..., ttl_secs: _Optional[int] = ..., certificate_days: _Optional[int] = ...) -> None: ...

class Invite(_message.Message):
    __slots__ = ("token", "expires_unix_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_unix_ms: int
    def __init__(self, token: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("role", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Revoked(_message.Message):
    __slots__ = ("role", "name", "at_unix_ms", "by")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    at_unix_ms: int
    by: str
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ..., at_unix_ms: _Optional[int] = ..., by: _Optional[str] = ...) -> None: ...

class StudyRef(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("study_id", "round")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class StudyInfo(_message.Message):
    __slots__ = ("study_id", "name", "manifest_hash", "state", "rounds_completed", "rounds_total", "created_unix_ms", "reason")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    name: str
    manifest_hash: str
    state: StudyState
    rounds_completed: int
    rounds_total: int
    created_unix_ms: int
    reason: str
    def __init__(self, study_id: _Optional[str] = ..., name: _Optional[str] = ..., manifest_hash: _Optional[str] = ..., state: _Optional[_Union[StudyState, str]] = ..., rounds_completed: _Optional[int] = ..., rounds_total: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StudyList(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[StudyInfo]
    def __init__(self, studies: _Optional[_Iterable[_Union[StudyInfo, _Mapping]]] = ...) -> None: ...

class RoundRecord(_message.Message):
    __slots__ = ("round", "committed", "selected", "contributors", "num_examples", "mean_train_loss", "started_unix_ms", "finished_unix_ms", "reason", "attempt", "clip_norm", "next_clip_norm", "eval_sites", "eval_examples", "eval_accuracy", "eval_loss", "eval_auc", "eval_noised")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MEAN_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NEXT_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    EVAL_SITES_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_AUC_FIELD_NUMBER: _ClassVar[int]
    EVAL_NOISED_FIELD_NUMBER: _ClassVar[int]
    round: int
    committed: bool
    selected: _containers.RepeatedScalarFieldContainer[str]
    contributors: _containers.RepeatedScalarFieldContainer[str]
    num_examples: int
    mean_train_loss: float
    started_unix_ms: int
    finished_unix_ms: int
    reason: str
    attempt: int
    clip_norm: float
    next_clip_norm: float
    eval_sites: int
    eval_examples: int
    eval_accuracy: float
    eval_loss: float
    eval_auc: float
    eval_noised: bool
    def __init__(self, round: _Optional[int] = ..., committed: _Optional[bool] = ..., selected: _Optional[_Iterable[str]] = ..., contributors: _Optional[_Iterable[str]] = ..., num_examples: _Optional[int] = ..., mean_train_loss: _Optional[float] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ..., attempt: _Optional[int] = ..., clip_norm: _Optional[float] = ..., next_clip_norm: _Optional[float] = ..., eval_sites: _Optional[int] = ..., eval_examples: _Optional[int] = ..., eval_accuracy: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_auc: _Optional[float] = ..., eval_noised: _Optional[bool] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("site", "round", "reason", "at_unix_ms")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    reason: str
    at_unix_ms: int
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ..., at_unix_ms: _Optional[int] = ...) -> None: ...

class OpenRound(_message.Message):
    __slots__ = ("round", "selected", "received", "deadline_unix_ms", "min_sites")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_SITES_FIELD_NUMBER: _ClassVar[int]
    round: int
    selected: _containers.RepeatedScalarFieldContainer[str]
    received: _containers.RepeatedScalarFieldContainer[str]
    deadline_unix_ms: int
    min_sites: int
    def __init__(self, round: _Optional[int] = ..., selected: _Optional[_Iterable[str]] = ..., received: _Optional[_Iterable[str]] = ..., deadline_unix_ms: _Optional[int] = ..., min_sites: _Optional[int] = ...) -> None: ...

class StudyStatus(_message.Message):
    __slots__ = ("info", "rounds", "refusals", "open_round", "manifest_toml")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_TOML_FIELD_NUMBER: _ClassVar[int]
    info: StudyInfo
    rounds: _containers.RepeatedCompositeFieldContainer[RoundRecord]
    refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    open_round: OpenRound
    manifest_toml: str
    def __init__(self, info: _Optional[_Union[StudyInfo, _Mapping]] = ..., rounds: _Optional[_Iterable[_Union[RoundRecord, _Mapping]]] = ..., refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ..., open_round: _Optional[_Union[OpenRound, _Mapping]] = ..., manifest_toml: _Optional[str] = ...) -> None: ...

class StudyEvent(_message.Message):
    __slots__ = ("study_id", "kind", "round", "site", "message", "at_unix_ms", "status")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    kind: EventKind
    round: int
    site: str
    message: str
    at_unix_ms: int
    status: StudyStatus
    def __init__(self, study_id: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., message: _Optional[str] = ..., at_unix_ms: _Optional[int] = ..., status: _Optional[_Union[StudyStatus, _Mapping]] = ...) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("name", "connected", "last_seen_unix_ms", "datasets", "agent_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    connected: bool
    last_seen_unix_ms: int
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    agent_version: str
    def __init__(self, name: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix_ms: _Optional[int] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class SiteList(_message.Message):
    __slots__ = ("sites", "revoked")
    SITES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    revoked: _containers.RepeatedCompositeFieldContainer[Revoked]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ..., revoked: _Optional[_Iterable[_Union[Revoked, _Mapping]]] = ...) -> None: ...

class DashboardLink(_message.Message):
    __slots__ = ("url", "expires_unix_ms", "certificate_sha256")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    url: str
    expires_unix_ms: int
    certificate_sha256: str
    def __init__(self, url: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ..., certificate_sha256: _Optional[str] = ...) -> None: ...

class AuditLogRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class AuditLogLine(_message.Message):
    __slots__ = ("line",)
    LINE_FIELD_NUMBER: _ClassVar[int]
    line: str
    def __init__(self, line: _Optional[str] = ...) -> None: ...

class LedgerRequest(_message.Message):
    __slots__ = ("study_id", "site", "dataset")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    site: str
    dataset: str
    def __init__(self, study_id: _Optional[str] = ..., site: _Optional[str] = ..., dataset: _Optional[str] = ...) -> None: ...

class LedgerCharge(_message.Message):
    __slots__ = ("study_id", "round", "site", "dataset", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "epsilon_before", "epsilon_after", "at_unix_ms", "enforcement", "epsilon_method", "pld_interval")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_AFTER_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_METHOD_FIELD_NUMBER: _ClassVar[int]
    PLD_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    round: int
    site: str
    dataset: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    epsilon_before: float
    epsilon_after: float
    at_unix_ms: int
    enforcement: str
    epsilon_method: str
    pld_interval: float
    def __init__(self, study_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., dataset: _Optional[str] = ..., mechanism: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., clip_norm: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_before: _Optional[float] = ..., epsilon_after: _Optional[float] = ..., at_unix_ms: _Optional[int] = ..., enforcement: _Optional[str] = ..., epsilon_method: _Optional[str] = ..., pld_interval: _Optional[float] = ...) -> None: ...

class LedgerReport(_message.Message):
    __slots__ = ("study_id", "budget_epsilon", "delta", "charges", "trained_tensors")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CHARGES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    budget_epsilon: float
    delta: float
    charges: _containers.RepeatedCompositeFieldContainer[LedgerCharge]
    trained_tensors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, study_id: _Optional[str] = ..., budget_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., charges: _Optional[_Iterable[_Union[LedgerCharge, _Mapping]]] = ..., trained_tensors: _Optional[_Iterable[str]] = ...) -> None: ...
