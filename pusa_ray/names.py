"""The names users type for tasks and schedules, in one torch-free module: the CLI and the
request schema import them without loading the model stack; `tasks.py` and `timesteps.py`
implement exactly these."""

from __future__ import annotations

from typing import Literal, get_args

TaskName = Literal["t2v", "i2v", "start-end", "keyframes", "extend", "complete", "transition"]
ScheduleName = Literal["sync", "lead"]  # how the frames of a video share the sampler's steps

TASKS: tuple[str, ...] = get_args(TaskName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

# Step caching (`pusa_ray.step_cache`): "off", or "first-block[:T[:R]]": reuse the other blocks'
# residual of the last computed step where the first block's residual changed less than T
# (default 0.1) in every frame, at most R steps in a row (default 2).
CACHE_POLICIES: tuple[str, ...] = ("off", "first-block")
DEFAULT_CACHE_THRESHOLD = 0.1  # near-lossless on pusa-mini (bench/cache.py; README 'Speed')
DEFAULT_CACHE_MAX_REUSE = 2


def parse_cache(text: str) -> tuple[str, float, int]:
    """`off` or `first-block[:T[:R]]` -> (policy, threshold, max reuse); ValueError naming the rule."""
    policy, *numbers = text.strip().split(":")
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache {text!r}: the policy must be one of {', '.join(CACHE_POLICIES)}")
    if policy == "off":
        if numbers:
            raise ValueError(f"cache {text!r}: 'off' takes no threshold")
        return policy, 0.0, 0
    if len(numbers) > 2:
        raise ValueError(f"cache {text!r}: give at most a threshold and a reuse count, first-block:T:R")
    threshold, max_reuse = DEFAULT_CACHE_THRESHOLD, DEFAULT_CACHE_MAX_REUSE
    try:
        if numbers:
            threshold = float(numbers[0])
        if len(numbers) == 2:
            max_reuse = int(numbers[1])
    except ValueError:
        raise ValueError(f"cache {text!r}: T must be a number and R a whole number") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"cache {text!r}: the threshold must lie in [0, 1]")
    if not 1 <= max_reuse <= 10:
        raise ValueError(f"cache {text!r}: the reuse count must lie in 1..10")
    return policy, threshold, max_reuse
