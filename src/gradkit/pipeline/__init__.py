"""Decoupled pipelines: schedules as data, stage workers, and the executors that run them."""

from gradkit.pipeline.local import LocalExecutor, Message, TimelineEntry
from gradkit.pipeline.schedule import (
    Action,
    DelayedGradientSchedule,
    ReplaySchedule,
    Schedule,
    SynchronousSchedule,
    SyntheticGradientSchedule,
)
from gradkit.pipeline.worker import PipelineError, StageWorker

__all__ = [
    "Action",
    "DelayedGradientSchedule",
    "LocalExecutor",
    "Message",
    "PipelineError",
    "ReplaySchedule",
    "Schedule",
    "StageWorker",
    "SynchronousSchedule",
    "SyntheticGradientSchedule",
    "TimelineEntry",
]
