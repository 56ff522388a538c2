"""Conditioning plans: which latent frames are given, with which clean latent and noise multiplier.

Every Pusa task is data. A task builder turns user media (images, clips) into `MediaCondition`s
placed at latent positions; `encode_plan` encodes them into a `ConditionPlan` that the one
sampler consumes. The sampler never sees a task name.

Positions are latent indices. With a codec of temporal factor T (4 for Wan), latent 0 is pixel
frame 0 and latent j >= 1 covers pixel frames T*j-T+1 .. T*j, so pixel frame p is latent
(p + T - 1) // T, and a video of F = 1 + T*k frames has k + 1 latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pusa_ray.errors import UserInputError

# Noise multipliers of the public Pusa scripts.
I2V_NOISE = 0.2
START_END_NOISE = (0.2, 0.5)
# Given clip latents are frozen (0.0) except up to three next to the generated region, which get
# this ramp (nearest last); the latent farthest from the generated region always stays frozen.
# A 4-latent leading clip: 0.0, 0.3, 0.4, 0.5; a 3-latent trailing clip: 0.5, 0.4, 0.0.
CLIP_EDGE_RAMP = (0.3, 0.4, 0.5)


class SegmentEncoder(Protocol):
    """What plans need from a latent codec (see `pusa_ray.models.codec`)."""

    temporal_factor: int

    def encode_segment(self, pixels: torch.Tensor, trailing: bool) -> torch.Tensor:
        """Pixels `[B, 3, f, H, W]` in [-1, 1] -> normalised latents `[B, C, k, h, w]`."""
        ...


@dataclass(frozen=True)
class MediaCondition:
    """Pixels to encode and place, from `latent_start`, one noise multiplier per latent."""

    pixels: torch.Tensor  # [3, f, H, W] in [-1, 1]
    latent_start: int
    noise_multipliers: tuple[float, ...]
    trailing: bool = False  # a trailing clip segment of T*k frames (see WanCodec.encode_segment)

    @property
    def latent_indices(self) -> tuple[int, ...]:
        return tuple(range(self.latent_start, self.latent_start + len(self.noise_multipliers)))


@dataclass(frozen=True)
class ConditionPlan:
    """Given latent frames: indices, clean latents `[C, K, h, w]` and noise multipliers `[K]`."""

    latent_indices: tuple[int, ...] = ()
    latents: torch.Tensor | None = None  # [C, K, h, w]
    noise_multipliers: tuple[float, ...] = ()

    def frame_multipliers(self, num_latents: int) -> torch.Tensor:
        """Per-frame noise multipliers `[F]` (float32): 1 for generated frames, m_k for given ones."""
        validate_indices(self.latent_indices, num_latents)
        multipliers = torch.ones(num_latents, dtype=torch.float32)
        for index, multiplier in zip(self.latent_indices, self.noise_multipliers, strict=True):
            multipliers[index] = multiplier
        return multipliers


def latents_for_frames(frames: int, temporal: int = 4) -> int:
    """Latent frames of a 1 + T*k frame video; other frame counts are an error."""
    if frames < 1 or (frames - 1) % temporal:
        raise UserInputError(f"frames must be 1 + {temporal}*k (e.g. {1 + 4 * temporal}), got {frames}")
    return (frames - 1) // temporal + 1


def pixel_to_latent(pixel_frame: int, temporal: int = 4) -> int:
    """Latent index that holds a pixel frame."""
    return (pixel_frame + temporal - 1) // temporal


def segment_latents(frames: int, trailing: bool, temporal: int = 4) -> int:
    """Latents a clip segment yields: leading 1 + T*k frames -> k + 1; trailing T*k frames -> k."""
    if trailing:
        if frames < temporal or frames % temporal:
            raise UserInputError(
                f"a trailing clip segment needs a multiple of {temporal} frames, got {frames}"
            )
        return frames // temporal
    if frames < 1 or (frames - 1) % temporal:
        raise UserInputError(f"a leading clip segment needs 1 + {temporal}*k frames (e.g. 13), got {frames}")
    return (frames - 1) // temporal + 1


def parse_position(text: str, num_latents: int, num_frames: int, temporal: int = 4) -> int:
    """A latent index (`5`, `-1` from the end) or a pixel frame (`f:40`, `f:-1`) -> latent index."""
    pixel = text.startswith("f:")
    raw = text[2:] if pixel else text
    try:
        value = int(raw)
    except ValueError:
        raise UserInputError(f"position {text!r} is not an integer latent index or f:PIXEL_FRAME") from None
    limit = num_frames if pixel else num_latents
    if not -limit <= value < limit:
        unit = "pixel frame" if pixel else "latent index"
        raise UserInputError(f"{unit} {text!r} is out of range for {limit} {unit}s")
    value %= limit
    return pixel_to_latent(value, temporal) if pixel else value


def expand_noise(
    noise: Sequence[float] | None, count: int, default: Sequence[float], what: str
) -> tuple[float, ...]:
    """One multiplier per conditioned latent: a single value applies to all; counts must match."""
    values = tuple(default if noise is None or len(noise) == 0 else noise)
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise UserInputError(f"{what}: got {len(values)} noise multipliers for {count} conditioned latents")
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise UserInputError(f"noise multiplier {value} is outside [0, 1]")
    return values


def clip_noise(leading: int, trailing: int) -> tuple[float, ...]:
    """Default multipliers for a leading clip of `leading` latents and a trailing one of `trailing`."""
    lead = [0.0] * leading
    ramp = list(CLIP_EDGE_RAMP[-(leading - 1) :]) if leading > 1 else []
    lead[leading - len(ramp) :] = ramp
    trail = [0.0] * trailing
    ramp = list(reversed(CLIP_EDGE_RAMP))[: max(trailing - 1, 0)]
    trail[: len(ramp)] = ramp
    return tuple(lead + trail)


def validate_indices(indices: Sequence[int], num_latents: int) -> None:
    """Every index in range and none twice."""
    seen: set[int] = set()
    for index in indices:
        if not 0 <= index < num_latents:
            raise UserInputError(f"latent index {index} is out of range for {num_latents} latent frames")
        if index in seen:
            raise UserInputError(f"two conditions on latent {index}")
        seen.add(index)


def _as_frame(image: torch.Tensor) -> torch.Tensor:
    """An image `[3, H, W]` as a one-frame clip `[3, 1, H, W]`."""
    return image[:, None] if image.ndim == 3 else image


def text_to_video() -> list[MediaCondition]:
    """No given frames."""
    return []


def image_to_video(image: torch.Tensor, noise: Sequence[float] | None = None) -> list[MediaCondition]:
    """The image is latent 0."""
    multipliers = expand_noise(noise, 1, (I2V_NOISE,), "i2v")
    return [MediaCondition(_as_frame(image), 0, multipliers)]


def start_end(
    image: torch.Tensor, end_image: torch.Tensor, num_latents: int, noise: Sequence[float] | None = None
) -> list[MediaCondition]:
    """First image at latent 0, last image (encoded as a one-frame video) at the last latent."""
    first, last = expand_noise(noise, 2, START_END_NOISE, "start-end")
    return [
        MediaCondition(_as_frame(image), 0, (first,)),
        MediaCondition(_as_frame(end_image), num_latents - 1, (last,)),
    ]


def keyframes(items: Sequence[tuple[int, torch.Tensor, float]]) -> list[MediaCondition]:
    """Images at given latent indices, each with its own noise multiplier."""
    conditions = []
    for index, image, noise in sorted(items, key=lambda item: item[0]):
        conditions.append(MediaCondition(_as_frame(image), index, expand_noise([noise], 1, (), "keyframes")))
    return conditions


def _need_frames(clip: torch.Tensor, frames: int, what: str) -> None:
    if clip.shape[1] < frames:
        raise UserInputError(f"{what} has {clip.shape[1]} frames, {frames} are needed")


def extend(
    clip: torch.Tensor,
    cond_frames: int,
    num_latents: int,
    noise: Sequence[float] | None = None,
    temporal: int = 4,
) -> list[MediaCondition]:
    """The clip's last `cond_frames` frames (1 + T*k) become the first frames of the new video."""
    count = segment_latents(cond_frames, trailing=False, temporal=temporal)
    if count > num_latents:
        raise UserInputError(f"extend: {count} conditioned latents do not fit in {num_latents} latent frames")
    _need_frames(clip, cond_frames, "--video")
    multipliers = expand_noise(noise, count, clip_noise(count, 0), "extend")
    return [MediaCondition(clip[:, -cond_frames:], 0, multipliers)]


def _lead_and_tail(
    head: torch.Tensor,
    tail: torch.Tensor,
    num_latents: int,
    noise: Sequence[float] | None,
    what: str,
    temporal: int,
) -> list[MediaCondition]:
    leading = segment_latents(head.shape[1], trailing=False, temporal=temporal)
    trailing = segment_latents(tail.shape[1], trailing=True, temporal=temporal)
    if leading + trailing > num_latents:
        raise UserInputError(
            f"{what}: {leading} leading + {trailing} trailing latents do not fit in "
            f"{num_latents} latent frames"
        )
    multipliers = expand_noise(noise, leading + trailing, clip_noise(leading, trailing), what)
    return [
        MediaCondition(head, 0, multipliers[:leading]),
        MediaCondition(tail, num_latents - trailing, multipliers[leading:], trailing=True),
    ]


def complete(
    clip: torch.Tensor,
    cond_frames: int,
    end_frames: int,
    num_latents: int,
    noise: Sequence[float] | None = None,
    temporal: int = 4,
) -> list[MediaCondition]:
    """Keep the clip's first `cond_frames` and last `end_frames` at the start and end; fill between."""
    _need_frames(clip, cond_frames + end_frames, "--video")
    head, tail = clip[:, :cond_frames], clip[:, clip.shape[1] - end_frames :]
    return _lead_and_tail(head, tail, num_latents, noise, "complete", temporal)


def transition(
    clip: torch.Tensor,
    end_clip: torch.Tensor,
    cond_frames: int,
    end_frames: int,
    num_latents: int,
    noise: Sequence[float] | None = None,
    temporal: int = 4,
) -> list[MediaCondition]:
    """The last `cond_frames` of `clip` open the video; the first `end_frames` of `end_clip` close it."""
    _need_frames(clip, cond_frames, "--video")
    _need_frames(end_clip, end_frames, "--end-video")
    head, tail = clip[:, clip.shape[1] - cond_frames :], end_clip[:, :end_frames]
    return _lead_and_tail(head, tail, num_latents, noise, "transition", temporal)


def encode_plan(
    conditions: Sequence[MediaCondition], encoder: SegmentEncoder, num_latents: int
) -> ConditionPlan:
    """Encode each condition's pixels and lay the latents out as one plan."""
    if not conditions:
        return ConditionPlan()
    indices = [index for condition in conditions for index in condition.latent_indices]
    validate_indices(indices, num_latents)
    encoded = []
    for condition in conditions:
        latents = encoder.encode_segment(condition.pixels[None], condition.trailing)[0]  # [C, k, h, w]
        if latents.shape[1] != len(condition.noise_multipliers):
            raise ValueError(
                f"segment of {condition.pixels.shape[1]} frames encoded to {latents.shape[1]} latents, "
                f"expected {len(condition.noise_multipliers)}"
            )
        encoded.append(latents)
    multipliers = tuple(m for condition in conditions for m in condition.noise_multipliers)
    return ConditionPlan(tuple(indices), torch.cat(encoded, dim=1), multipliers)
