"""A video request: the schema that the HTTP API, the batch job and the client share, with
every parameter bounded; its media as task inputs; and running it with the core pipeline.

A request mirrors `pusa-ray generate`: the task, the prompt, media for the task (base64 data or
s3:// URIs), sampling settings and an optional adapter.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from pusa_ray.config import StrictModel
from pusa_ray.names import ScheduleName, TaskName, parse_cache

if TYPE_CHECKING:
    from pusa_ray.models.loading import Components
    from pusa_ray.pipeline import Generation, SamplingSettings
    from pusa_ray.sampler import ProgressCallback
    from pusa_ray.tasks import TaskInputs


class Media(StrictModel):
    """An image or clip: exactly one of `data` (base64) or `uri` (s3://, within the allowed prefixes)."""

    data: str | None = Field(default=None, description="base64-encoded file bytes")
    uri: str | None = Field(default=None, max_length=1024, description="s3:// URI")

    @model_validator(mode="after")
    def _one_source(self) -> Media:
        if (self.data is None) == (self.uri is None):
            raise ValueError("give exactly one of 'data' (base64) or 'uri'")
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError("'uri' must be an s3:// URI")
        return self

    def decoded(self) -> bytes:
        """The base64 payload's bytes (validated at request time)."""
        if self.data is None:
            raise ValueError("this media item is a URI, not inline data")
        return base64.b64decode(self.data, validate=True)

    @field_validator("data")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        if not raw:
            raise ValueError("is empty")
        return value


class Keyframe(StrictModel):
    position: str = Field(max_length=16, description="latent index (e.g. '10', '-1') or pixel frame 'f:40'")
    image: Media
    noise: float = Field(ge=0.0, le=1.0)


class VideoRequest(StrictModel):
    """POST /v1/videos."""

    task: TaskName = "t2v"
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    image: Media | None = None
    end_image: Media | None = None
    keyframes: list[Keyframe] = Field(default_factory=list, max_length=64)
    video: Media | None = None
    end_video: Media | None = None
    cond_frames: int | None = Field(default=None, ge=1, le=1025)
    end_frames: int | None = Field(default=None, ge=1, le=1024)
    noise: list[float] | None = Field(default=None, max_length=256)
    frames: int | None = Field(default=None, ge=1, le=1025)
    height: int | None = Field(default=None, ge=16, le=2048)
    width: int | None = Field(default=None, ge=16, le=2048)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    shift: float | None = Field(default=None, gt=0.0, le=100.0)
    schedule: ScheduleName | None = None  # None: the model's
    cache: str | None = Field(
        default=None, max_length=32, description="step caching: off or first-block[:T[:R]]"
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    fps: float | None = Field(default=None, gt=0.0, le=120.0)
    adapter: str | None = Field(default=None, min_length=1, max_length=1024)
    adapter_alpha: float = Field(default=1.4, ge=0.0, le=4.0)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("cache")
    @classmethod
    def _cache_policy(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cache(value)
        return value

    @field_validator("noise")
    @classmethod
    def _noise_in_range(cls, value: list[float] | None) -> list[float] | None:
        for item in value or []:
            if not 0.0 <= item <= 1.0:
                raise ValueError(f"noise multiplier {item} is outside [0, 1]")
        return value

    def media_fields(self) -> dict[str, Media]:
        """Every media item by a stable name (`image`, `keyframes.0.image`, ...)."""
        named = {name: getattr(self, name) for name in ("image", "end_image", "video", "end_video")}
        named.update({f"keyframes.{i}.image": frame.image for i, frame in enumerate(self.keyframes)})
        return {name: media for name, media in named.items() if media is not None}


def task_inputs(request: VideoRequest) -> TaskInputs:
    """The request's media as task inputs: s3:// URIs by reference, inline data as bytes."""
    from pusa_ray.tasks import TaskInputs

    def source(media: Media | None) -> str | bytes | None:
        if media is None:
            return None
        return media.uri if media.uri is not None else media.decoded()

    return TaskInputs(
        task=request.task,
        image=source(request.image),
        end_image=source(request.end_image),
        keyframes=tuple((frame.position, source(frame.image), frame.noise) for frame in request.keyframes),
        video=source(request.video),
        end_video=source(request.end_video),
        cond_frames=request.cond_frames,
        end_frames=request.end_frames,
        noise=tuple(request.noise) if request.noise else None,
    )


def run_request(
    components: Components,
    request: VideoRequest,
    settings: SamplingSettings,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Generation:
    """Load the request's media, build its conditions and sample: the service's and batch job's core."""
    from pusa_ray.pipeline import generate
    from pusa_ray.tasks import VideoShape, build_conditions

    shape = VideoShape(settings.frames, settings.height, settings.width, components.codec.temporal_factor)
    conditions = build_conditions(task_inputs(request), shape)
    return generate(components, request.prompt, conditions, settings, progress, should_cancel)


def write_outputs(
    result: Generation, fps: float, video_uri: str, latents_uri: str, thumbnail_uri: str | None = None
) -> None:
    """The latents (safetensors, tensor `latents`), the first frame as a PNG when asked for, then the
    mp4: a video in storage marks the outputs done."""
    from PIL import Image
    from safetensors.torch import save as save_safetensors

    from pusa_ray import storage, video

    storage.write_bytes(latents_uri, save_safetensors({"latents": result.latents.float().contiguous()}))
    frames = video.tensor_to_frames(result.video)
    if thumbnail_uri is not None:
        buffer = io.BytesIO()
        Image.fromarray(frames[0]).save(buffer, format="PNG")
        storage.write_bytes(thumbnail_uri, buffer.getvalue())
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "video.mp4"
        video.write_mp4(local, frames, fps)
        storage.upload_file(local, video_uri)
