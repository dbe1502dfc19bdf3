from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUNDS_MODE_SYNC: _ClassVar[RoundsMode]
    ROUNDS_MODE_ASYNC: _ClassVar[RoundsMode]

class TrainingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_MODE_FEDERATED: _ClassVar[TrainingMode]
    TRAINING_MODE_DISTRIBUTED: _ClassVar[TrainingMode]

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    UPDATE_KIND_DELTA: _ClassVar[UpdateKind]
    UPDATE_KIND_INITIAL: _ClassVar[UpdateKind]

class UpdateResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_RESULT_UNSPECIFIED: _ClassVar[UpdateResult]
    UPDATE_RESULT_ACCEPTED: _ClassVar[UpdateResult]
    UPDATE_RESULT_DUPLICATE: _ClassVar[UpdateResult]
    UPDATE_RESULT_STALE: _ClassVar[UpdateResult]
    UPDATE_RESULT_EARLY: _ClassVar[UpdateResult]
    UPDATE_RESULT_NOT_NEEDED: _ClassVar[UpdateResult]
    UPDATE_RESULT_NOT_SELECTED: _ClassVar[UpdateResult]
ROUNDS_MODE_SYNC: RoundsMode
ROUNDS_MODE_ASYNC: RoundsMode
TRAINING_MODE_FEDERATED: TrainingMode
TRAINING_MODE_DISTRIBUTED: TrainingMode
UPDATE_KIND_UNSPECIFIED: UpdateKind
UPDATE_KIND_DELTA: UpdateKind
UPDATE_KIND_INITIAL: UpdateKind
UPDATE_RESULT_UNSPECIFIED: UpdateResult
UPDATE_RESULT_ACCEPTED: UpdateResult
UPDATE_RESULT_DUPLICATE: UpdateResult
UPDATE_RESULT_STALE: UpdateResult
UPDATE_RESULT_EARLY: UpdateResult
UPDATE_RESULT_NOT_NEEDED: UpdateResult
UPDATE_RESULT_NOT_SELECTED: UpdateResult

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("task_index", "description", "instance")
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    task_index: int
    description: str
    instance: str
    def __init__(self, task_index: _Optional[int] = ..., description: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("member_id", "lease_seconds", "round", "total_rounds", "done", "replicas_to_aggregate", "mode", "update_encoding", "secure_aggregation", "rounds_mode", "federated_eval_every", "calls_hold_lease", "long_poll_seconds")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TO_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_MODE_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    CALLS_HOLD_LEASE_FIELD_NUMBER: _ClassVar[int]
    LONG_POLL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    lease_seconds: float
    round: int
    total_rounds: int
    done: bool
    replicas_to_aggregate: int
    mode: TrainingMode
    update_encoding: str
    secure_aggregation: SecAggParameters
    rounds_mode: RoundsMode
    federated_eval_every: int
    calls_hold_lease: bool
    long_poll_seconds: float
    def __init__(self, member_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., done: _Optional[bool] = ..., replicas_to_aggregate: _Optional[int] = ..., mode: _Optional[_Union[TrainingMode, str]] = ..., update_encoding: _Optional[str] = ..., secure_aggregation: _Optional[_Union[SecAggParameters, _Mapping]] = ..., rounds_mode: _Optional[_Union[RoundsMode, str]] = ..., federated_eval_every: _Optional[int] = ..., calls_hold_lease: _Optional[bool] = ..., long_poll_seconds: _Optional[float] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("member_id", "have_round", "update", "secagg_keys")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KEYS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    have_round: int
    update: UpdateHeader
    secagg_keys: SecAggKeys
    def __init__(self, member_id: _Optional[str] = ..., have_round: _Optional[int] = ..., update: _Optional[_Union[UpdateHeader, _Mapping]] = ..., secagg_keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("kind", "round", "num_examples", "loss", "accuracy", "tensors", "encoding", "update_id", "federated_eval")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_EVAL_FIELD_NUMBER: _ClassVar[int]
    kind: UpdateKind
    round: int
    num_examples: int
    loss: float
    accuracy: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    encoding: str
    update_id: bytes
    federated_eval: FederatedEvalReport
    def __init__(self, kind: _Optional[_Union[UpdateKind, str]] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., encoding: _Optional[str] = ..., update_id: _Optional[bytes] = ..., federated_eval: _Optional[_Union[FederatedEvalReport, _Mapping]] = ...) -> None: ...

class FederatedEvalReport(_message.Message):
    __slots__ = ("round", "loss", "accuracy", "num_examples")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    accuracy: float
    num_examples: int
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ...) -> None: ...

class FederatedEvalResult(_message.Message):
    __slots__ = ("round", "workers")
    class WorkersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: FederatedEvalReport
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[FederatedEvalReport, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    workers: _containers.MessageMap[int, FederatedEvalReport]
    def __init__(self, round: _Optional[int] = ..., workers: _Optional[_Mapping[int, FederatedEvalReport]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "data", "end", "renewal", "secagg_shares", "secagg_reveal")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_FIELD_NUMBER: _ClassVar[int]
    SECAGG_SHARES_FIELD_NUMBER: _ClassVar[int]
    SECAGG_REVEAL_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    data: bytes
    end: bool
    renewal: bool
    secagg_shares: SecAggShares
    secagg_reveal: SecAggReveal
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[bool] = ..., renewal: _Optional[bool] = ..., secagg_shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., secagg_reveal: _Optional[_Union[SecAggReveal, _Mapping]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("round", "result")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    round: int
    result: UpdateResult
    def __init__(self, round: _Optional[int] = ..., result: _Optional[_Union[UpdateResult, str]] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("ready", "round", "done", "total_rounds", "tensors", "train_loss", "train_accuracy", "encoding", "epsilon", "federated_eval", "server_learning_rate")
    READY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_EVAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    round: int
    done: bool
    total_rounds: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    train_loss: float
    train_accuracy: float
    encoding: str
    epsilon: float
    federated_eval: FederatedEvalResult
    server_learning_rate: float
    def __init__(self, ready: _Optional[bool] = ..., round: _Optional[int] = ..., done: _Optional[bool] = ..., total_rounds: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., train_loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., encoding: _Optional[str] = ..., epsilon: _Optional[float] = ..., federated_eval: _Optional[_Union[FederatedEvalResult, _Mapping]] = ..., server_learning_rate: _Optional[float] = ...) -> None: ...

class PsMessage(_message.Message):
    __slots__ = ("receipt", "model", "data", "secagg_roster", "secagg_inbox", "secagg_unmask")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SECAGG_ROSTER_FIELD_NUMBER: _ClassVar[int]
    SECAGG_INBOX_FIELD_NUMBER: _ClassVar[int]
    SECAGG_UNMASK_FIELD_NUMBER: _ClassVar[int]
    receipt: Receipt
    model: ModelHeader
    data: bytes
    secagg_roster: SecAggRoster
    secagg_inbox: SecAggShares
    secagg_unmask: SecAggUnmask
    def __init__(self, receipt: _Optional[_Union[Receipt, _Mapping]] = ..., model: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., secagg_roster: _Optional[_Union[SecAggRoster, _Mapping]] = ..., secagg_inbox: _Optional[_Union[SecAggShares, _Mapping]] = ..., secagg_unmask: _Optional[_Union[SecAggUnmask, _Mapping]] = ...) -> None: ...

class SecAggParameters(_message.Message):
    __slots__ = ("clip_range", "max_update_norm", "noise")
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    clip_range: float
    max_update_norm: float
    noise: SecAggNoise
    def __init__(self, clip_range: _Optional[float] = ..., max_update_norm: _Optional[float] = ..., noise: _Optional[_Union[SecAggNoise, _Mapping]] = ...) -> None: ...

class SecAggNoise(_message.Message):
    __slots__ = ("clip", "noise_multiplier", "expected_updates")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    clip: float
    noise_multiplier: float
    expected_updates: float
    def __init__(self, clip: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., expected_updates: _Optional[float] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("cipher_key", "mask_key")
    CIPHER_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    cipher_key: bytes
    mask_key: bytes
    def __init__(self, cipher_key: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class SecAggParty(_message.Message):
    __slots__ = ("task_index", "keys")
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    task_index: int
    keys: SecAggKeys
    def __init__(self, task_index: _Optional[int] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("round", "parties", "graph_seed", "degree", "threshold")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    round: int
    parties: _containers.RepeatedCompositeFieldContainer[SecAggParty]
    graph_seed: bytes
    degree: int
    threshold: int
    def __init__(self, round: _Optional[int] = ..., parties: _Optional[_Iterable[_Union[SecAggParty, _Mapping]]] = ..., graph_seed: _Optional[bytes] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("round", "sender", "recipient", "sealed", "key_commitment", "seed_commitment")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    KEY_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    round: int
    sender: int
    recipient: int
    sealed: bytes
    key_commitment: bytes
    seed_commitment: bytes
    def __init__(self, round: _Optional[int] = ..., sender: _Optional[int] = ..., recipient: _Optional[int] = ..., sealed: _Optional[bytes] = ..., key_commitment: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggUnmask(_message.Message):
    __slots__ = ("round", "survivors", "dropped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggRevealed(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggReveal(_message.Message):
    __slots__ = ("round", "seed_shares", "key_shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    seed_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    key_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    def __init__(self, round: _Optional[int] = ..., seed_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round", "done")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("member_id", "round", "loss", "accuracy")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    round: int
    loss: float
    accuracy: float
    def __init__(self, member_id: _Optional[str] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
