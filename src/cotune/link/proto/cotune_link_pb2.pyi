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

class Encoded(_message.Message):
    __slots__ = ("format", "shape", "parts")
    class PartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    format: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    parts: _containers.MessageMap[str, Tensor]
    def __init__(self, format: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., parts: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "fingerprint", "total_steps", "num_labels", "problem", "steps_done")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    fingerprint: str
    total_steps: int
    num_labels: int
    problem: str
    steps_done: int
    def __init__(self, protocol: _Optional[str] = ..., fingerprint: _Optional[str] = ..., total_steps: _Optional[int] = ..., num_labels: _Optional[int] = ..., problem: _Optional[str] = ..., steps_done: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("steps_done",)
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    steps_done: int
    def __init__(self, steps_done: _Optional[int] = ...) -> None: ...

class Calibrate(_message.Message):
    __slots__ = ("state",)
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _containers.MessageMap[str, Tensor]
    def __init__(self, state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("step", "train", "batch_shape", "mask", "activations", "labels", "backward")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    step: int
    train: bool
    batch_shape: _containers.RepeatedScalarFieldContainer[int]
    mask: Tensor
    activations: Encoded
    labels: Tensor
    backward: bool
    def __init__(self, step: _Optional[int] = ..., train: _Optional[bool] = ..., batch_shape: _Optional[_Iterable[int]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., activations: _Optional[_Union[Encoded, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., backward: _Optional[bool] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("step", "grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: Encoded
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[Encoded, _Mapping]] = ...) -> None: ...

class Aggregate(_message.Message):
    __slots__ = ("round", "weight", "state")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    weight: float
    state: _containers.MessageMap[str, Tensor]
    def __init__(self, round: _Optional[int] = ..., weight: _Optional[float] = ..., state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("hello", "calibrate", "forward", "backward", "aggregate")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CALIBRATE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    calibrate: Calibrate
    forward: Forward
    backward: Backward
    aggregate: Aggregate
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., calibrate: _Optional[_Union[Calibrate, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., backward: _Optional[_Union[Backward, _Mapping]] = ..., aggregate: _Optional[_Union[Aggregate, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Result(_message.Message):
    __slots__ = ("step", "loss", "grad", "output", "logits")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad: Encoded
    output: Encoded
    logits: Tensor
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad: _Optional[_Union[Encoded, _Mapping]] = ..., output: _Optional[_Union[Encoded, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Averaged(_message.Message):
    __slots__ = ("round", "participants", "state")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: int
    state: _containers.MessageMap[str, Tensor]
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[int] = ..., state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("welcome", "ack", "result", "error", "averaged")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    result: Result
    error: Error
    averaged: Averaged
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., averaged: _Optional[_Union[Averaged, _Mapping]] = ...) -> None: ...
