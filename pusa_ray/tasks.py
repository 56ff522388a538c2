"""The Pusa tasks: user media (paths, URIs or bytes) -> conditions for the one sampler.

Each task is a small function from a `TaskInputs` to a list of `MediaCondition`s; the CLI, the
Serve app and batch jobs all go through `build_conditions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pusa_ray import conditioning as plans
from pusa_ray import video
from pusa_ray.errors import UserInputError
from pusa_ray.names import TASKS

MediaSource = str | Path | bytes


@dataclass(frozen=True)
class TaskInputs:
    """What a user gives for a task; unused fields must stay empty."""

    task: str
    image: MediaSource | None = None
    end_image: MediaSource | None = None
    keyframes: tuple[tuple[str, MediaSource, float], ...] = ()  # (position, image, noise)
    video: MediaSource | None = None
    end_video: MediaSource | None = None
    cond_frames: int | None = None
    end_frames: int | None = None
    noise: tuple[float, ...] | None = None


@dataclass(frozen=True)
class VideoShape:
    """Target size of the generated video and its latent frame count."""

    frames: int
    height: int
    width: int
    temporal: int = 4
    num_latents: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_latents", plans.latents_for_frames(self.frames, self.temporal))


def _fetch(source: MediaSource) -> Path | bytes:
    """Local paths stay paths; s3:// URIs are read through the storage layer."""
    if isinstance(source, str) and source.startswith("s3://"):
        from pusa_ray import storage

        return storage.read_bytes(source)
    return source if isinstance(source, bytes) else Path(source)


def load_image(source: MediaSource, shape: VideoShape) -> torch.Tensor:
    """An image resized and centre-cropped to the target: `[3, 1, H, W]` in [-1, 1]."""
    pixels = video.read_image(_fetch(source))
    frames = video.resize_center_crop(pixels[None], shape.height, shape.width)
    return video.frames_to_tensor(frames)


def load_clip(source: MediaSource, shape: VideoShape) -> torch.Tensor:
    """A clip, frame by frame (no resampling), resized to the target: `[3, f, H, W]` in [-1, 1]."""
    frames, _fps = video.read_video(_fetch(source))
    return video.frames_to_tensor(video.resize_center_crop(frames, shape.height, shape.width))


def default_lead_frames(shape: VideoShape) -> int:
    """About the first sixth of the video, as 1 + T*k frames (13 of 81 frames)."""
    return 1 + shape.temporal * max(1, (shape.num_latents - 1) // 6)


def default_tail_frames(shape: VideoShape) -> int:
    """About the last sixth of the video, as T*k frames (12 of 81 frames)."""
    return shape.temporal * max(1, (shape.num_latents - 1) // 6)


# task -> (required inputs, optional inputs); `task` and `noise` are always accepted.
TASK_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t2v": ((), ()),
    "i2v": (("image",), ()),
    "start-end": (("image", "end_image"), ()),
    "keyframes": (("keyframes",), ()),
    "extend": (("video",), ("cond_frames",)),
    "complete": (("video",), ("cond_frames", "end_frames")),
    "transition": (("video", "end_video"), ("cond_frames", "end_frames")),
}


def _given(value: object) -> bool:
    return value is not None and value != ()


def _conditioned_latents(inputs: TaskInputs, shape: VideoShape) -> int:
    """How many latents the task conditions, from frame counts alone."""
    if inputs.task == "i2v":
        return 1
    if inputs.task == "start-end":
        return 2
    leading = plans.segment_latents(inputs.cond_frames or default_lead_frames(shape), False, shape.temporal)
    if inputs.task == "extend":
        trailing = 0
    else:
        end_frames = inputs.end_frames or default_tail_frames(shape)
        trailing = plans.segment_latents(end_frames, True, shape.temporal)
    if leading + trailing > shape.num_latents:
        raise UserInputError(
            f"{inputs.task}: {leading} + {trailing} conditioned latents do not fit in "
            f"{shape.num_latents} latent frames"
        )
    return leading + trailing


def validate_inputs(inputs: TaskInputs, shape: VideoShape) -> None:
    """Every check that needs no media decoding: fields, positions, noise counts and ranges."""
    if inputs.task not in TASK_FIELDS:
        raise UserInputError(f"unknown task {inputs.task!r} (known: {', '.join(TASK_FIELDS)})")
    needed, optional = TASK_FIELDS[inputs.task]
    for name in TaskInputs.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        if name in needed and not _given(getattr(inputs, name)):
            raise UserInputError(f"task {inputs.task!r} needs {flag}")
        if name not in (*needed, *optional, "task", "noise") and _given(getattr(inputs, name)):
            raise UserInputError(f"task {inputs.task!r} does not take {flag}")
    if inputs.task in ("t2v", "keyframes"):
        if inputs.noise:
            where = (
                "has no conditioned frames"
                if inputs.task == "t2v"
                else "takes each noise in --cond POS:PATH:NOISE"
            )
            raise UserInputError(f"task {inputs.task!r} {where}, so --noise does not apply")
        indices = []
        for position, _source, noise in inputs.keyframes:
            indices.append(plans.parse_position(position, shape.num_latents, shape.frames, shape.temporal))
            plans.expand_noise([noise], 1, (), "keyframes")
        plans.validate_indices(indices, shape.num_latents)
        return
    count = _conditioned_latents(inputs, shape)
    plans.expand_noise(inputs.noise, count, (0.0,), inputs.task)


def _t2v(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    return plans.text_to_video()


def _i2v(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    return plans.image_to_video(load_image(inputs.image, shape), inputs.noise)


def _start_end(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    first, last = load_image(inputs.image, shape), load_image(inputs.end_image, shape)
    return plans.start_end(first, last, shape.num_latents, inputs.noise)


def _keyframes(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    items = []
    for position, source, noise in inputs.keyframes:
        index = plans.parse_position(position, shape.num_latents, shape.frames, shape.temporal)
        items.append((index, load_image(source, shape), noise))
    return plans.keyframes(items)


def _extend(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    cond_frames = inputs.cond_frames or default_lead_frames(shape)
    clip = load_clip(inputs.video, shape)
    return plans.extend(clip, cond_frames, shape.num_latents, inputs.noise, shape.temporal)


def _complete(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    cond_frames = inputs.cond_frames or default_lead_frames(shape)
    end_frames = inputs.end_frames or default_tail_frames(shape)
    clip = load_clip(inputs.video, shape)
    return plans.complete(clip, cond_frames, end_frames, shape.num_latents, inputs.noise, shape.temporal)


def _transition(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    cond_frames = inputs.cond_frames or default_lead_frames(shape)
    end_frames = inputs.end_frames or default_tail_frames(shape)
    clip, end_clip = load_clip(inputs.video, shape), load_clip(inputs.end_video, shape)
    return plans.transition(
        clip, end_clip, cond_frames, end_frames, shape.num_latents, inputs.noise, shape.temporal
    )


TASK_BUILDERS: dict[str, Callable[[TaskInputs, VideoShape], list[plans.MediaCondition]]] = {
    "t2v": _t2v,
    "i2v": _i2v,
    "start-end": _start_end,
    "keyframes": _keyframes,
    "extend": _extend,
    "complete": _complete,
    "transition": _transition,
}
if set(TASK_BUILDERS) != set(TASKS):  # pusa_ray.names lists what users may ask for: one builder each
    raise ImportError(f"task builders {sorted(TASK_BUILDERS)} do not match pusa_ray.names.TASKS {TASKS}")


def build_conditions(inputs: TaskInputs, shape: VideoShape) -> list[plans.MediaCondition]:
    """Check the inputs, then load the task's media at the target size and place it on latent positions."""
    validate_inputs(inputs, shape)
    return TASK_BUILDERS[inputs.task](inputs, shape)
