"""HTTP API types: requests are validated here, with every parameter bounded.

A request mirrors `pusa-ray generate`: the task, the prompt, media for the task (base64 data or
s3:// URIs), sampling settings and an optional adapter.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pusa_ray.names import ScheduleName, TaskName

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Media(Strict):
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


class Keyframe(Strict):
    position: str = Field(max_length=16, description="latent index (e.g. '10', '-1') or pixel frame 'f:40'")
    image: Media
    noise: float = Field(ge=0.0, le=1.0)


class VideoRequest(Strict):
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


class JobView(BaseModel):
    """GET /v1/videos/{id}."""

    id: str
    status: JobStatus
    progress: float = 0.0
    task: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_reason: str | None = None
    error: str | None = None
    attempts: int = 0
    parameters: dict = Field(default_factory=dict)
    adapter: str | None = None
    outputs: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    data: list[JobView]
    next_after: str | None = None


class ErrorBody(BaseModel):
    error: dict
