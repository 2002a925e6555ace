"""Methods: each one module (or package) declaring a `MethodSpec`; `registry` names them.

Read one method top to bottom in its own module; the machinery below it (training loop,
task adapters, link, models) is shared, and the runtime executes the spec.
"""

from cotune.methods.registry import get_spec, method_names, register, resolve
from cotune.methods.spec import (
    AcceptedUpdate,
    ClientEvaluation,
    ClientUpdate,
    CloudOutcome,
    CloudService,
    DeviceOutcome,
    FederatedSpec,
    LocalSpec,
    MethodResult,
    MethodSpec,
    NullRecorder,
    ServerHook,
    SplitSpec,
    State,
)
from cotune.training.loop import Recorder

__all__ = [
    "AcceptedUpdate",
    "ClientEvaluation",
    "ClientUpdate",
    "CloudOutcome",
    "CloudService",
    "DeviceOutcome",
    "FederatedSpec",
    "LocalSpec",
    "MethodResult",
    "MethodSpec",
    "NullRecorder",
    "Recorder",
    "ServerHook",
    "SplitSpec",
    "State",
    "get_spec",
    "method_names",
    "register",
    "resolve",
]
