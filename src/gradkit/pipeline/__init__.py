"""Decoupled pipelines: typed actions, the schedule base, pipeline stages, the single-process executor, and
parameters shared by several stages (``shared.py``).

Each pipelined method (``gradkit.methods``: fr, ddg, dni, and bp's synchronous form) defines its own
schedule and stage in its own module; what they share is here.
"""

from gradkit.pipeline.local import LocalExecutor, Message, TimelineEntry
from gradkit.pipeline.schedule import ACTIVATION, DATA, DELTA, LABEL, Action, Op, Schedule
from gradkit.pipeline.shared import SharedParameter, shared_parameters
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = [
    "ACTIVATION",
    "DATA",
    "DELTA",
    "LABEL",
    "Action",
    "LocalExecutor",
    "Message",
    "Op",
    "PipelineError",
    "PipelineStage",
    "Schedule",
    "SharedParameter",
    "TimelineEntry",
    "shared_parameters",
]
