"""avgctl's wire protocol, imported by both sides: commands, the worker's frames, bounds, close codes.

It needs only pydantic: a training process imports it without any server code.
"""

from avgctl.protocol.bounds import JOB_ID_MAX_LENGTH, JOB_ID_PATTERN, MAX_PERIOD, MAX_SCALARS, JobId, StorableInt
from avgctl.protocol.commands import (
    WORKER_COMMAND_TYPES,
    AverageNow,
    Command,
    PauseAveraging,
    PauseTraining,
    ResumeAveraging,
    ResumeTraining,
    SetAutotune,
    SetHierarchy,
    SetOuterLr,
    SetPeriod,
    WorkerCommand,
)
from avgctl.protocol.frames import (
    AveragerConfig,
    CommandAck,
    CommandDelivery,
    ControlEvent,
    ControlView,
    Hello,
    MetricsBatch,
    MetricsStored,
    RoundRecord,
    ServerMessage,
    StepRecord,
    WorkerMessage,
)

__all__ = [
    "JOB_ID_MAX_LENGTH",
    "JOB_ID_PATTERN",
    "MAX_PERIOD",
    "MAX_SCALARS",
    "WORKER_COMMAND_TYPES",
    "AverageNow",
    "AveragerConfig",
    "Command",
    "CommandAck",
    "CommandDelivery",
    "ControlEvent",
    "ControlView",
    "Hello",
    "JobId",
    "MetricsBatch",
    "MetricsStored",
    "PauseAveraging",
    "PauseTraining",
    "ResumeAveraging",
    "ResumeTraining",
    "RoundRecord",
    "ServerMessage",
    "SetAutotune",
    "SetHierarchy",
    "SetOuterLr",
    "SetPeriod",
    "StepRecord",
    "StorableInt",
    "WorkerCommand",
    "WorkerMessage",
]
