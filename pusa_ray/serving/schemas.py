"""HTTP API types of the job views; the request itself is `pusa_ray.video_request.VideoRequest`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class JobView(BaseModel):
    """GET /v1/videos/{id}."""

    id: str
    status: JobStatus
    progress: float = 0.0
    step: int | None = None  # sampler steps done of `steps`, while in progress
    steps: int | None = None
    task: str
    prompt: str | None = None
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
