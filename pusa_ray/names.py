"""The names users type for tasks and schedules, in one torch-free module: the CLI and the
request schema import them without loading the model stack; `tasks.py` and `timesteps.py`
implement exactly these."""

from __future__ import annotations

from typing import Literal, get_args

TaskName = Literal["t2v", "i2v", "start-end", "keyframes", "extend", "complete", "transition"]
ScheduleName = Literal["sync", "lead"]  # how the frames of a video share the sampler's steps

TASKS: tuple[str, ...] = get_args(TaskName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
